#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package index: what the project needs beyond what such a machine
# already has (a CUDA build of torch, accelerate, peft, tokenizers, sentencepiece, pyarrow, ...), downloaded
# here for its Python (3.12, x86-64 Linux) into .whl/ (git-ignored). There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (bench/gpu_checks.sh and bench/gpu_scripts.sh do it with WHEELS=.whl). DeepSpeed ships no wheel: it is built
# here (pure Python; its CUDA ops compile on first use there). Not included: bitsandbytes (its CUDA wheel
# alone is larger than what a run may carry), so --qlora and the QLoRA benchmark recipes need it installed.
#   bash scripts/gpu_wheels.sh [DIR]    # default .whl; PYTHON_VERSION=3.12 by default
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
mkdir -p "$dest"
# Pinned to what the tests pass with here; each with the packages it needs that such a machine lacks.
packages=(
    transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 tomlkit==0.15.3 regex==2026.11.19
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 hf-xet==1.8.0 click==8.5.1 typing_extensions==4.16.0
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    trl==1.16.0
    deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2
    liger-kernel==0.8.5
    rouge-chinese==1.0.3 jieba==0.42.1 nltk==3.10.4 defusedxml==0.7.1
    orjson==3.13.0
)
download() {
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$dest" "$1"
}
for package in "${packages[@]}"; do
    if ! download "$package" 2>/dev/null; then  # a source-only release (deepspeed, jieba, rouge-chinese): build it
        python3 -m pip wheel -q --disable-pip-version-check --no-deps -w "$dest" "$package"
    fi
done
ls "$dest"
du -sh "$dest"
