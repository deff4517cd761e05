"""Shared fixtures: a tiny MiniCPM + tokenizer built once per test session, and small data files."""

import json
import os
import socket
import subprocess

import pytest

# The package is imported as installed (pip install -e .), or from the repository root, which
# `python -m pytest` puts on sys.path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use only local folders; never wait on the network

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


def run(args, cwd=ROOT, env=None, timeout=600):
    """Run a command; return the CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port():
    """A TCP port free right now, for a DeepSpeed / torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
