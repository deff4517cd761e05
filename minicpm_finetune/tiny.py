"""A tiny MiniCPM and a SentencePiece tokenizer trained on the fly, for tests and the CPU demo.

    python -m minicpm_finetune.tiny --output_dir DIR [--data FILE ...] [--chat_template minicpm|chatml|minicpm5]
        [--pretrain_steps N]

The model has MiniCPM's architecture and non-trivial muP scalings; the tokenizer is a byte-fallback
SentencePiece BPE model laid out as MiniCPM-2B's (``tokenizer.model``, ``legacy: true``, user-defined
punctuation pieces), with the chat template saved in its config. The folder loads with
``--model_name_or_path DIR``.

A random model is a poor stand-in for a real one under LoRA: its embeddings and tied head stay frozen,
and with hidden size 64 their logits are capped near std * dim_model_base (about 1.6 at the tests'
init), so the loss cannot fall far. The command line therefore "pretrains" by default: a wider logit
range (dim_model_base 32, init std 0.25: cap about 8) and a few hundred full-parameter steps of plain
language modelling on the tokenizer's texts, each string on its own (attribute lists and ads never
paired, no chat template), so the model knows the words before it learns the task, as a real one does.
The tests' fixtures keep the random model (``pretrain_steps=0``: fast, and their exact checks need none).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile

from .cli import OneLineParser, atomic_path, command

# A little built-in text so a tokenizer can be trained without any data file.
BASE_CORPUS = [
    "你好，有什么可以帮你的吗？", "今天天气很好，我们去公园散步吧。", "这款连衣裙显瘦又文艺，适合夏天穿。",
    "Hello, how can I help you today?", "The quick brown fox jumps over the lazy dog.",
    "0123456789 + - * / = ( ) [ ] { } # , . ! ?", "类型#裙*版型#显瘦*风格#文艺*图案#印花",
]


def texts_of_file(path: str):
    """Every string value in a JSON / JSON Lines data file, whatever its format."""
    from .data.sources import DataError, read_records, record_is_unreadable

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from strings(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from strings(value)

    for number, obj in read_records(path):
        if record_is_unreadable(obj):
            raise DataError(f"{path}:{number}: {obj}")
        yield from strings(obj)


# Pieces MiniCPM-2B's SentencePiece model holds as user-defined (1,086 there): always one piece, never merged.
USER_DEFINED_PIECES = ["，", "。", "！", "？", "：", "；", "、", "\n", "\t", "<td>", "</td>", "<strong>", "</strong>",
                       "<br/>"]
# The template inside MiniCPM-2B's tokenizer_config.json, in substance: no system turn, nothing after a reply.
MINICPM_2B_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                       "{{ '<用户>' + message['content'].strip() + '<AI>' }}"
                       "{% else %}{{ message['content'].strip() }}{% endif %}{% endfor %}")


def build_tokenizer(output_dir: str, texts: list[str], chat_template: str = "minicpm", vocab_size: int = 1024):
    """Train a byte-fallback SentencePiece BPE on ``texts`` and save it with a chat template; returns it
    loaded.

    ``minicpm``: laid out as MiniCPM-2B ships its tokenizer: ``tokenizer.model`` (no dummy prefix, no
    whitespace folding, Chinese punctuation, "\n", "\t" and HTML tags as user-defined pieces) and a
    ``tokenizer_config.json`` with ``legacy: true`` and the template inside (ours, and a pad token, so that
    tests can render with it); loaded as the toolkit loads every tokenizer (tokenizer.py). ``chatml``: as
    MiniCPM3/4 ship theirs, a ``tokenizer.json`` with the ChatML markers as special tokens and the template.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from .data.templates import TEMPLATES, apply_template
    from .data.tokenizer import load_tokenizer

    minicpm_2b = chat_template == "minicpm"
    markers = ["<用户>", "<AI>"] if minicpm_2b else ["system", "user", "assistant"]
    corpus = BASE_CORPUS + markers + list(texts)
    # Every character needs a piece (plus 256 byte pieces and 3 specials); give merges some room on top.
    needed = len(set("".join(corpus))) + 256 + 3 + len(USER_DEFINED_PIECES)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
        vocab_size=max(vocab_size, needed + 32), hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        add_dummy_prefix=not minicpm_2b, user_defined_symbols=USER_DEFINED_PIECES if minicpm_2b else [],
    )
    settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": True}
    template = TEMPLATES[chat_template]
    if minicpm_2b:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(settings, chat_template=template.text, pad_token="<unk>"), f, ensure_ascii=False, indent=2)
        return load_tokenizer(output_dir)
    with tempfile.TemporaryDirectory() as raw:
        with open(os.path.join(raw, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        with open(os.path.join(raw, "tokenizer_config.json"), "w") as f:
            json.dump(settings, f)
        tokenizer = AutoTokenizer.from_pretrained(raw)
    tokenizer.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    apply_template(tokenizer, template.text)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def tiny_config(vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2, **overrides):
    """A small MiniCPM config with MiniCPM-2B's structure and non-trivial scalings."""
    from .models.configuration_minicpm import MiniCPMConfig

    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        scale_emb=12.0, dim_model_base=16, scale_depth=1.4,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, initializer_range=0.1,
    )
    settings.update(overrides)
    return MiniCPMConfig(**settings)


# Model shapes besides the tiny one: MiniCPM-2B's (2.72B parameters, its 122,753-word vocabulary; the tiny
# tokenizer's ids are a part of it), random, for runs on a GPU that measure speed and memory as on the real one.
SHAPES = {
    "tiny": {},
    "minicpm-2b": dict(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
                       num_attention_heads=36, num_key_value_heads=36, dim_model_base=256, max_position_embeddings=4096,
                       initializer_range=0.1),
}

# Init for a pretrained tiny model: logits can reach about std * dim_model_base = 8 (random init: 1.6).
PRETRAIN_CONFIG = dict(dim_model_base=32, initializer_range=0.25)


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int = 0, batch_size: int = 16,
             learning_rate: float = 3e-3, log=print) -> float:
    """Full-parameter language modelling on ``texts``, one string per row (BOS text EOS); returns the last loss."""
    import random

    import torch

    rows = sorted(set(texts))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = min(20, steps)  # then linear decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps))
    model.train()
    for step in range(steps):
        batch = tokenizer([rng.choice(rows) + tokenizer.eos_token for _ in range(batch_size)], return_tensors="pt",
                          padding=True, truncation=True, max_length=128, add_special_tokens=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step == 0 or (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def build_tiny(output_dir: str, data_files=(), chat_template: str = "minicpm", seed: int = 0, pretrain_steps: int = 0,
               shape: str = "tiny", **config_overrides) -> str:
    """Write a tiny MiniCPM and its tokenizer to ``output_dir`` (atomically) and return the path: random, or
    with ``pretrain_steps`` > 0 pretrained on the tokenizer's texts (see the module docstring). ``shape``
    (SHAPES) other than tiny: a random model of that size, built on the GPU when there is one and saved in bf16,
    as the official checkpoints are."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = [t for path in data_files for t in texts_of_file(path)]
    with atomic_path(output_dir, folder=True) as staging:
        tokenizer = build_tokenizer(staging, texts, chat_template)
        torch.manual_seed(seed)
        if pretrain_steps:
            config_overrides = {**PRETRAIN_CONFIG, **config_overrides}
        settings = {"vocab_size": len(tokenizer), **SHAPES[shape], **config_overrides}
        config = tiny_config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
        large = shape != "tiny"
        with torch.device("cuda" if large and torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if large else torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if pretrain_steps:
            pretrain(model, tokenizer, BASE_CORPUS + texts, pretrain_steps, seed)
        model.save_pretrained(staging)
        if os.path.exists(output_dir):  # a rebuild replaces the old model
            shutil.rmtree(output_dir)
    return output_dir


@command
def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m minicpm_finetune.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data", nargs="*", default=[], help="data files whose text trains the tokenizer")
    parser.add_argument("--chat_template", choices=["minicpm", "chatml", "minicpm5"], default="minicpm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=300,
                        help="language-modelling steps on the tokenizer's texts so the model learns like a real one "
                             "(0: a random model)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="minicpm-2b: a random model of MiniCPM-2B's size and vocabulary, in bf16 (with "
                             "--pretrain_steps 0), for speed and memory runs on a GPU")
    args = parser.parse_args(argv)
    build_tiny(args.output_dir, args.data, args.chat_template, args.seed, args.pretrain_steps, args.shape)
    kind = f"pretrained ({args.pretrain_steps} steps)" if args.pretrain_steps else "random"
    print(f"wrote a {kind} MiniCPM of shape {args.shape} and its tokenizer to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
