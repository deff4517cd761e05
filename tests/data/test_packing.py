"""Packing: rows, masks, and the same loss and gradients as padded batches; memory switches."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import QA, conversation, write_jsonl
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from minicpm_finetune.data import IGNORE_INDEX, load_conversations, tokenize_dataset
from minicpm_finetune.data.packing import PackingCollator, first_fit_decreasing, pack_dataset
from minicpm_finetune.data.tokenizer import load_tokenizer

SYSTEMS = [None, "你是一个有帮助的助手。", "Answer briefly."]


def raw_dataset(lengths, seed=0, vocab=200, all_learned=False):
    """Random samples; with all_learned every label (the first too) is a real token."""
    import datasets

    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab, n).tolist() for n in lengths]
    labels = [list(x) if all_learned else [IGNORE_INDEX] * (n // 2) + x[n // 2:] for x, n in zip(ids, lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": list(lengths)})


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.padding_side = "right"  # as model.load_tokenizer sets it for training
    return tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tokenizer):
    """Real tokenized conversations of different lengths (with and without a system prompt)."""
    records = [conversation(q, a * (1 + i % 2), SYSTEMS[i % 3]) for i, (q, a) in enumerate(QA * 3)]
    path = write_jsonl(tmp_path_factory.mktemp("packing") / "train.jsonl", records)
    dataset, _ = tokenize_dataset(load_conversations(path), tokenizer, 96)
    return dataset


def fp32_model(path, attn="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # as model.load_model sets it (with a cache, LlamaModel ignores packed position_ids)
    return model.train()  # no dropout in these models; train() as the Trainer runs them


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- packing step


def test_first_fit_decreasing_fills_rows_deterministically():
    lengths = np.random.default_rng(1).integers(1, 200, 500)
    bins = first_fit_decreasing(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 256 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 256 * 1.1))  # within 10% of perfect
    assert bins == first_fit_decreasing(lengths, 256)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([300], 256)


def test_pack_dataset_restarts_positions_and_masks_each_first_label():
    lengths = [5, 3, 7, 2, 6, 4]
    dataset = raw_dataset(lengths, all_learned=True)
    packed = pack_dataset(dataset, 10)
    seen = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) <= 10
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [row["length"]]
        for begin, end in zip(bounds, bounds[1:]):
            assert row["position_ids"][begin:end] == list(range(end - begin))
            tokens = row["input_ids"][begin:end]
            index = next(i for i, x in enumerate(dataset["input_ids"]) if x == tokens)
            seen.append(index)
            # Labels as in the sample, except its first, which must not be learned from the previous sample.
            assert row["labels"][begin:end] == [IGNORE_INDEX] + dataset[index]["labels"][1:]
    assert sorted(seen) == list(range(len(lengths)))


def test_padding_is_only_to_the_longest_sample(samples, tokenizer):
    """Without --packing a batch is padded to its own longest sample (finetune.py's collator), not to max length."""
    features = [samples[i] for i in range(4)]
    longest = max(f["length"] for f in features)
    collated = PackingCollator(tokenizer)([{k: f[k] for k in ("input_ids", "labels")} for f in features])
    plain = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(
        [{k: f[k] for k in ("input_ids", "labels")} for f in features])
    assert longest < 96
    for batch in (collated, plain):
        assert batch["input_ids"].shape == (4, longest)
        assert batch["attention_mask"].sum(1).tolist() == [f["length"] for f in features]


def test_collator_pads_rows_as_a_separate_block(tokenizer):
    rows = pack_dataset(raw_dataset([6, 5, 3]), 8)
    batch = PackingCollator(tokenizer)([rows[i] for i in range(len(rows))])
    assert "attention_mask" not in batch
    short = int(np.argmin([len(r) for r in rows["input_ids"]]))
    n = rows[short]["length"]
    assert batch["position_ids"][short, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    flat = PackingCollator(tokenizer, flatten=True)([rows[i] for i in range(len(rows))])
    assert flat["input_ids"].shape == (1, sum(rows["length"]))


# --------------------------------------------------------------------------- same loss, same gradients


def padded_batch(dataset, tokenizer):
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    return collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset])


def packed_batch(dataset, tokenizer, row_length, flatten=False):
    rows = pack_dataset(dataset, row_length)
    assert len(rows) < len(dataset)  # really packed
    return PackingCollator(tokenizer, flatten=flatten)([rows[i] for i in range(len(rows))])


def assert_same_loss_and_grads(model, plain, packed):
    loss_a, grads_a = loss_and_grads(model, plain)
    loss_b, grads_b = loss_and_grads(model, packed)
    assert grads_a.keys() == grads_b.keys() and grads_a
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for name in grads_a:
        scale = grads_a[name].abs().max()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6 * float(scale), msg=name)


@pytest.mark.parametrize("attn, flatten", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_loss_and_gradients_equal_padded(tiny_model, tokenizer, samples, attn, flatten):
    """One padded batch of all samples vs the same samples packed in rows: the mean over the same learned tokens."""
    model = fp32_model(tiny_model, attn)
    assert_same_loss_and_grads(model, padded_batch(samples, tokenizer),
                               packed_batch(samples, tokenizer, 96, flatten))


def test_no_label_crosses_a_sample_boundary(tiny_model, tokenizer):
    """Every token learned, the first too: equal losses need each sample's first label masked in the rows."""
    dataset = raw_dataset([9, 17, 4, 12, 30, 7, 21], vocab=len(tokenizer), all_learned=True)
    model = fp32_model(tiny_model)
    assert_same_loss_and_grads(model, padded_batch(dataset, tokenizer), packed_batch(dataset, tokenizer, 40))


def test_attention_stays_inside_each_sample(tiny_model, tokenizer, samples):
    model = fp32_model(tiny_model).eval()
    rows = pack_dataset(samples, 96)
    batch = PackingCollator(tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        row = 0
        positions = rows[row]["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for begin, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][row:row + 1, begin:end]).logits[0]
            torch.testing.assert_close(logits[row, begin:end], alone, rtol=1e-5, atol=1e-5)
    assert len(starts) > 2  # the row held several samples


def test_chunked_loss_of_the_native_model_matches_when_packed(tiny_model, tokenizer, samples):
    """The native MiniCPM's chunked loss (small chunks) over packed rows equals the padded loss."""
    model = fp32_model(tiny_model)
    model.loss_chunk_size = 7
    assert_same_loss_and_grads(model, padded_batch(samples, tokenizer), packed_batch(samples, tokenizer, 96))


# --------------------------------------------------------------------------- flags


def train_args(tiny_model, data_dir, tmp_path, *extra):
    return ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--report_to", "none", "--model_max_length", "64", *extra]


@pytest.mark.slow
def test_finetune_with_packing_trains(tiny_model, data_dir, tmp_path, capsys):
    import finetune

    finetune.main(train_args(tiny_model, data_dir, tmp_path, "--packing", "--use_lora",
                             "--lora_target_modules", "q_proj,v_proj", "--per_device_train_batch_size", "2",
                             "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
                             "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "no"))
    assert "packing: 32 samples -> " in capsys.readouterr().out
    with open(tmp_path / "out" / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(np.isfinite(h.get("eval_loss", np.nan)) for h in history)  # unpacked validation set
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_bf16_lora_keeps_adapters_in_fp32(tiny_model, data_dir, tmp_path):
    from minicpm_finetune.training.arguments import parse_args
    from minicpm_finetune.models.loading import load_model

    model_args, _, training_args = parse_args(train_args(
        tiny_model, data_dir, tmp_path, "--bf16", "--use_lora", "--lora_target_modules", "q_proj,v_proj",
        "--activation_checkpointing"))
    model = load_model(model_args, training_args)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())


@pytest.mark.slow
def test_qlora_trains_with_packing_and_checkpointing(data_dir, tmp_path):
    """--qlora --packing --activation_checkpointing through finetune.py on the CPU (bitsandbytes' CPU
    backend): q/v are 4-bit NF4 under fp32 LoRA adapters, only the adapters train, the loss goes down, and
    the saved adapter on a freshly quantized base gives the trained model's logits."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    import finetune
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.training.arguments import parse_args
    from minicpm_finetune.models.loading import load_dtype, qlora_kwargs
    from minicpm_finetune.tiny import build_tiny

    # bitsandbytes' CPU inference kernel needs every in_features to be a multiple of its 64-value blocks,
    # as all of MiniCPM's are (2304, 5760); the shared tiny model's MLP width (160) is not.
    model_dir = build_tiny(str(tmp_path / "tiny"), [str(data_dir / "train.jsonl")], intermediate_size=128)

    args = train_args(model_dir, data_dir, tmp_path, "--qlora", "--packing", "--activation_checkpointing",
                      "--per_device_train_batch_size", "2", "--max_steps", "8", "--learning_rate", "2e-2",
                      "--logging_steps", "1", "--eval_generation", "false", "--save_strategy", "no")
    trainer = finetune.main(args)
    model = trainer.model.eval()
    attention = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attention.q_proj.base_layer, bitsandbytes.nn.Linear4bit)
    assert isinstance(attention.v_proj.base_layer, bitsandbytes.nn.Linear4bit)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0], losses

    _, _, training_args = parse_args(args)
    base = AutoModelForCausalLM.from_pretrained(model_dir,
                                                **qlora_kwargs(load_dtype(training_args), training_args.device))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_qlora_without_bitsandbytes_is_one_clear_error(tiny_model, data_dir, tmp_path, capsys, monkeypatch):
    import importlib.metadata

    import finetune

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # as on a machine without bitsandbytes
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(train_args(tiny_model, data_dir, tmp_path, "--qlora"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --qlora needs bitsandbytes: pip install bitsandbytes"]
