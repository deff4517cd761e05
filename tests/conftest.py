"""Shared fixtures: a tiny MiniCPM + tokenizer built once per test session, small data files, and random
models without a tokenizer (random_minicpm, on the package's tiny config).

Tiers: a test that trains through a Trainer (SFT or DPO, LoRA, QLoRA or full), starts several processes
(DeepSpeed, torch.distributed), runs a command in a subprocess (each pays for importing torch and
transformers again), executes the notebook, a benchmark, a demo script or a pip install is marked
``@pytest.mark.slow``. Everything else calls the code in this process on tiny inputs and must stay quick:
``python -m pytest tests -q -m "not slow"`` runs those alone; CI runs everything.
"""

import json
import os
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use only local folders; never wait on the network

# Imported after the settings above (huggingface_hub reads them on import), as installed (pip install -e .)
# or from the repository root, which `python -m pytest` puts on sys.path; the package before transformers,
# so that its logging and warning filters are in place.
import minicpm_finetune  # noqa: E402,F401
from minicpm_finetune.tiny import tiny_config  # noqa: E402
from transformers import LlamaConfig, MiniCPM3Config  # noqa: E402

# A small learnable data set: every question has one fixed answer.
QA = [
    ("你好", "你好，有什么可以帮你的吗？"),
    ("今天天气怎么样", "今天天气很好，适合散步。"),
    ("推荐一条裙子", "这款连衣裙显瘦又文艺。"),
    ("What is two plus two?", "Two plus two is four."),
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def conversation(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def mixed_text_corpus(synthetic: int = 800, seed: int = 0) -> list[str]:
    """Over 1,000 lines to compare token ids on: every text of the bundled AdvertiseGen sample's dev and test
    sets (Chinese with full-width punctuation), and generated lines mixing Chinese, English, digits, ASCII and
    full-width punctuation, runs of spaces, newlines and tabs, HTML tags, MiniCPM-2B's role markers and emoji."""
    import random

    texts = []
    for split in ("dev", "test"):
        with open(os.path.join(ROOT, "data", "advertisegen_chat", f"{split}.jsonl"), encoding="utf-8") as f:
            texts += [message["content"] for line in f for message in json.loads(line)["messages"]]
    words = ["这款", "连衣裙", "显瘦", "文艺", "你好", "价格", "元", "简约", "设计", "Hello", "world", "MiniCPM",
             "fine-tune", "LoRA", "2B", "299", "8.5", "2026", "0", "😀", "👍", "<用户>", "<AI>", "<td>", "</strong>",
             "<br/>", "类型#裙*颜色#红色"]
    marks = ["，", "。", "！", "？", "：", "；", "、", "「", "」", "（", "）", "……", "——", ",", ".", "!", "?", ":",
             ";", " ", "  ", "\n", "\t", "\n\n"]
    rng = random.Random(seed)
    for _ in range(synthetic):
        parts = [rng.choice(words if rng.random() < 0.6 else marks) for _ in range(rng.randint(1, 14))]
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train/dev/test JSONL in the conversation format (the train set repeats the QA pairs)."""
    folder = tmp_path_factory.mktemp("data")
    records = [conversation(q, a) for q, a in QA]
    write_jsonl(folder / "train.jsonl", records * 8)
    write_jsonl(folder / "dev.jsonl", records)
    write_jsonl(folder / "test.jsonl", records)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_dir):
    """A tiny random MiniCPM with a tokenizer trained on the test data (MiniCPM-2B chat template)."""
    from minicpm_finetune.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), [str(data_dir / "train.jsonl")])


@pytest.fixture(scope="session")
def tiny_chatml_model(tmp_path_factory, data_dir):
    from minicpm_finetune.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny_chatml") / "model"), [str(data_dir / "train.jsonl")],
                      chat_template="chatml")


# Random models without a tokenizer use token ids below VOCAB: 0 pad, 1 BOS, 2 EOS, the rest ordinary.
VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# A tiny config of every family in the table (families.FAMILIES): adding a family adds one here.
TINY_CONFIGS = {
    "minicpm": lambda: tiny_config(VOCAB),
    "minicpm3": lambda: MiniCPM3Config(**SMALL, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2),
}


def random_minicpm(tied=True, seed=0, **overrides):
    """A random native MiniCPM (the package's tiny config: 3 layers, VOCAB words) in eval mode."""
    import torch

    from minicpm_finetune.models.modeling_minicpm import MiniCPMForCausalLM

    settings = dict(intermediate_size=128, num_hidden_layers=3, max_position_embeddings=256, pad_token_id=0,
                    tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return MiniCPMForCausalLM(tiny_config(VOCAB, **{**settings, **overrides})).eval()


def random_ids(batch, length, seed=1):
    """Ordinary token ids (no special ones) for random_minicpm, the same for the same seed."""
    import torch

    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(args, cwd=ROOT, env=None, timeout=600):
    """Run a command; return the CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port():
    """A TCP port free right now, for a DeepSpeed / torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# A hybrid-reasoning template written for the tests, in the style of MiniCPM5-1B's and Qwen3's: a reply's
# <think> block is rendered only after the last user message; the generation prompt closes an empty block when
# enable_thinking is false.
STRIPPING = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + (m['reasoning_content'] or '') + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}")
