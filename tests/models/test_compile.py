"""--compile_layers: decoder layers compiled in place give the eager loss and gradients (full model, LoRA,
packed rows, checkpointing), train through finetune.py with the same adapter keys, and conflicting flags
are refused in one line.

CPU inductor compiles take seconds each, so every model here is compiled once and checked several ways;
the eager reference is the same model under torch.compiler.set_stance("force_eager").
"""

import contextlib
import gc
import os
import shutil

import pytest
import torch
from conftest import ROOT
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from minicpm_finetune.training.arguments import parse_args
from minicpm_finetune.data import IGNORE_INDEX, load_conversations, tokenize_dataset
from minicpm_finetune.models.loading import load_model
from minicpm_finetune.data.packing import PackingCollator, pack_dataset
from minicpm_finetune.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"),
                                reason="torch inductor needs a C++ compiler on the CPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled graphs: counts are its own, the recompile limit is not shared."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def arguments(tiny_model, data_dir, tmp_path, *extra):
    return parse_args(["--model_name_or_path", str(tiny_model), "--train_data_path", str(data_dir / "train.jsonl"),
                       "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
                       "--use_cpu", "--report_to", "none", *extra])


def compiled_model(tiny_model, data_dir, tmp_path, *extra):
    model_args, _, training_args = arguments(tiny_model, data_dir, tmp_path, "--compile_layers", *extra)
    return load_model(model_args, training_args).train(), training_args


@pytest.fixture(scope="module")
def samples(tiny_model, data_dir):
    """The four validation conversations, tokenized: 13-20 tokens, all different lengths."""
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.padding_side = "right"
    dataset, _ = tokenize_dataset(load_conversations(str(data_dir / "dev.jsonl")), tokenizer, 512)
    return dataset, tokenizer


def padded(samples, indices):
    dataset, tokenizer = samples
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    return collate([{k: dataset[i][k] for k in ("input_ids", "labels")} for i in indices])


def loss_and_grads(model, batch, eager=False):
    model.zero_grad(set_to_none=True)
    with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(result, expected):
    (loss, grads), (expected_loss, expected_grads) = result, expected
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss), (loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max()
        assert (grad - expected_grads[name]).abs().max() <= 1e-5 * scale + 1e-12, name


def compiled_and_eager(model, batch):
    """Compiled and eager loss and gradients of one batch, checked equal; returns the compiled ones and the
    number of graphs compiled for them."""
    graphs = counters["stats"]["unique_graphs"]
    result = loss_and_grads(model, batch)
    assert_same(result, loss_and_grads(model, batch, eager=True))
    return result, counters["stats"]["unique_graphs"] - graphs


def packed(samples, row_length, copies=1):
    """The samples packed into rows (position_ids restart per sample, no attention mask), as --packing does."""
    import datasets

    dataset, tokenizer = samples
    rows = pack_dataset(datasets.concatenate_datasets([dataset] * copies), row_length)
    return PackingCollator(tokenizer)([rows[i] for i in range(len(rows))])


@pytest.mark.slow
def test_full_model_packed_rows_and_checkpointing(tiny_model, data_dir, tmp_path, samples):
    model, training_args = compiled_model(tiny_model, data_dir, tmp_path)
    # Widths avoid the hidden size (64): torch would give equal sizes one symbol and specialize both.
    batch = packed(samples, 100, copies=2)  # 8 samples in rows of 88 and 40 tokens, padded to 128
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 128)
    assert (batch["position_ids"] == 0).sum() == 8 + 2  # every sample restarts, and each row's padding block
    full, new_graphs = compiled_and_eager(model, batch)
    assert new_graphs == 1  # the two layers share one graph
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    # Another width reuses the graph (dynamic shapes): no recompile per length.
    with torch.compiler.set_stance("fail_on_recompile"):
        wider = packed(samples, 150, copies=3)  # rows of 139 and 53 tokens, padded to 192
        assert wider["input_ids"].shape == (2, 192)
        compiled_and_eager(model, wider)

    # As the Trainer enables --gradient_checkpointing (non-reentrant, arguments.py): a new graph, same numbers.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=training_args.activation_checkpointing_kwargs)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed, _ = compiled_and_eager(model, batch)
    assert_same(checkpointed, full)


@pytest.mark.slow
def test_lora_padded_batches(tiny_model, data_dir, tmp_path, samples):
    model, _ = compiled_model(tiny_model, data_dir, tmp_path, "--use_lora", "--lora_r", "4", "--lora_dropout", "0")
    (_, grads), new_graphs = compiled_and_eager(model, padded(samples, [0, 1, 2, 3]))  # 20 tokens wide
    assert new_graphs == 1  # layer 0 too: its input requires grad (enable_input_require_grads)
    assert grads and all("lora_" in name for name in grads)  # only the adapter is trained
    assert all(layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled_and_eager(model, padded(samples, [0, 1, 2]))  # 17 wide


@pytest.mark.slow
def test_finetune_with_compile_layers_saves_the_eager_adapter_layout(tmp_path, tiny_model, data_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_finetune import logits, losses, train

    extra = ["--use_lora", "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "2e-2", "--max_steps", "10",
             "--eval_strategy", "no", "--max_new_tokens", "8"]
    train(tiny_model, data_dir, tmp_path / "eager", *extra)
    graphs = counters["stats"]["unique_graphs"]
    trainer = train(tiny_model, data_dir, tmp_path / "compiled", *extra, "--compile_layers")
    # Training compiled one graph per attention-mask kind (padded batches, and batches of equal lengths);
    # evaluation and generation at the end ran eager (a KV cache would have recompiled every layer).
    assert 1 <= counters["stats"]["unique_graphs"] - graphs <= 2

    compiled_losses, eager_losses = losses(tmp_path / "compiled")[0], losses(tmp_path / "eager")[0]
    assert compiled_losses[-1] < compiled_losses[0]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    saved = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    eager_saved = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in eager_saved.items()}
    assert not any("_orig_mod" in key for key in saved)

    tokenizer = load_tokenizer(tmp_path / "compiled")
    with torch.compiler.set_stance("force_eager"):
        expected = logits(trainer.model, tokenizer)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "compiled")
    assert torch.allclose(logits(loaded, tokenizer), expected, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--torch_compile"], "--compile_layers and --torch_compile both compile the model; pick one"),
    (["--deepspeed", os.path.join(ROOT, "configs", "ds_config_zero3.json")],
     "--compile_layers does not work under DeepSpeed ZeRO-3"),
], ids=["torch_compile", "zero3"])
def test_conflicting_flags_are_one_line(tmp_path, tiny_model, data_dir, capsys, extra, message):
    import finetune

    argv = ["--model_name_or_path", str(tiny_model), "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu",
            "--report_to", "none", "--compile_layers", *extra]
    try:
        with pytest.raises(SystemExit) as exit_info:
            finetune.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    finally:
        # The exit's traceback holds the ZeRO-3 TrainingArguments in a reference cycle, and transformers keeps
        # its DeepSpeed config as a global while it lives: later in-process runs would load models under ZeRO-3.
        del exit_info
        gc.collect()
