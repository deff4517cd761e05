"""The first-loss check (training/first_loss.py): the first training batch's loss against ln(vocab), through the
trainer's own compute_loss, on a model whose muP scalings are applied and on the same weights read without them."""

import math

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, LlamaForCausalLM, TrainingArguments

from minicpm_finetune.data import load_conversations, tokenize_dataset
from minicpm_finetune.data.tokenizer import load_tokenizer
from minicpm_finetune.models.modeling_minicpm import MiniCPMForCausalLM
from minicpm_finetune.tiny import tiny_config
from minicpm_finetune.training.first_loss import MARGIN, first_loss_lines
from minicpm_finetune.training.trainer import MiniCPMTrainer

WARNING = "warning: the first batch loss is more than"


@pytest.fixture(scope="module")
def first_batch(tiny_model, data_dir):
    """The QA conversations (dev.jsonl) in the tiny model's chat template, collated as a training batch."""
    tokenizer = load_tokenizer(tiny_model)
    dataset, _ = tokenize_dataset(load_conversations(str(data_dir / "dev.jsonl")), tokenizer, 512)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return collator([{key: row[key] for key in ("input_ids", "labels")} for row in dataset])


@pytest.fixture(scope="module")
def trained_minicpm(tiny_model, first_batch, tmp_path_factory):
    """A folder with a tiny MiniCPM carrying MiniCPM-2B's scalings (logits divided by 64 / 7 = 9.1 as 2304 / 256 = 9,
    residual branches times 0.313 / sqrt(2) = 0.22 as 1.4 / sqrt(40), embeddings times 12), trained until it
    knows the batch (30 full steps, a fraction of a second): a trained model, confident, as a real checkpoint."""
    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = MiniCPMForCausalLM(tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                           dim_model_base=7, scale_depth=0.313))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(30):
        model(**first_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = str(tmp_path_factory.mktemp("trained_minicpm"))
    model.save_pretrained(folder)
    return folder


def load(folder, scalings):
    """The checkpoint as this toolkit loads it, or its weights read unchanged by code that ignores the scalings:
    as a plain Llama (the shapes and names are Llama's), or as MiniCPM with the scalings set to neutral values."""
    if scalings == "applied":
        return MiniCPMForCausalLM.from_pretrained(folder)
    if scalings == "read_as_llama":
        return LlamaForCausalLM.from_pretrained(folder)
    config = MiniCPMForCausalLM.config_class.from_pretrained(folder)
    return MiniCPMForCausalLM.from_pretrained(folder, scale_emb=1.0, dim_model_base=config.hidden_size,
                                              scale_depth=math.sqrt(config.num_hidden_layers))


def trainer_for(model, output_dir):
    return MiniCPMTrainer(model=model, args=TrainingArguments(str(output_dir), use_cpu=True, report_to=[]))


def first_loss_output(model, batch, output_dir, capsys):
    """What the trainer prints for its first training micro-batch, through its compute_loss."""
    trainer = trainer_for(model, output_dir)
    capsys.readouterr()
    with torch.no_grad():
        trainer.compute_loss(model.train(), dict(batch))
    return capsys.readouterr().out


def mean_loss(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def printed_loss(out):
    lines = [line for line in out.splitlines() if line.startswith("first batch loss: ")]
    assert len(lines) == 1, out
    return float(lines[0].split()[3])


def test_the_lines_say_the_loss_against_ln_vocab_and_warn_only_far_above():
    uniform = math.log(1000)
    assert first_loss_lines(2.5, 1000) == [f"first batch loss: 2.500 (ln(vocab) = {uniform:.3f})"]
    assert len(first_loss_lines(uniform + MARGIN - 0.01, 1000)) == 1  # a random model scores about ln(vocab)
    info, warning = first_loss_lines(uniform + MARGIN + 0.01, 1000)
    assert warning.startswith(WARNING)
    assert all(cause in warning for cause in ("muP scalings", "scale_emb", "chat template", "tokenizer", "corrupted"))
    assert first_loss_lines(float("nan"), 1000)[1:] == first_loss_lines(float("inf"), 1000)[1:] == []


def test_no_warning_for_the_tiny_model_as_loaded(tiny_model, first_batch, tmp_path, capsys):
    """The tests' tiny model (random weights, scalings applied) scores about ln(vocab): said, no warning."""
    model = MiniCPMForCausalLM.from_pretrained(tiny_model)
    out = first_loss_output(model, first_batch, tmp_path, capsys)
    loss = mean_loss(model, first_batch)
    assert abs(loss - math.log(model.config.vocab_size)) < 1.0 and WARNING not in out, out
    assert printed_loss(out) == pytest.approx(loss, abs=1e-3)


@pytest.mark.parametrize("scalings", ["applied", "read_as_llama", "neutral_config"])
def test_the_warning_fires_on_the_trained_model_with_its_scalings_removed(trained_minicpm, first_batch, tmp_path,
                                                                         capsys, scalings):
    model = load(trained_minicpm, scalings)
    loss = mean_loss(model, first_batch)
    limit = math.log(model.config.vocab_size) + MARGIN
    out = first_loss_output(model, first_batch, tmp_path, capsys)
    assert printed_loss(out) == pytest.approx(loss, abs=1e-3)
    if scalings == "applied":
        assert loss < 1.0 and WARNING not in out, out  # it knows the batch
    else:
        assert loss > limit + 5 and WARNING in out, out  # the same weights, confidently wrong


def test_the_mean_is_recovered_under_gradient_accumulation_and_said_once(trained_minicpm, first_batch, tmp_path,
                                                                         capsys):
    """With num_items_in_batch (the labelled tokens of the step's 3 micro-batches) the model returns its sum over
    that count; the line still says this micro-batch's mean. Later calls and evaluation print nothing."""
    model = load(trained_minicpm, "read_as_llama")
    loss = mean_loss(model, first_batch)
    tokens = first_batch["labels"][:, 1:].ne(-100).sum()
    trainer = trainer_for(model, tmp_path)
    capsys.readouterr()
    with torch.no_grad():
        model.eval()
        trainer.compute_loss(model, dict(first_batch))  # an evaluation before training (eval_on_start)
        assert capsys.readouterr().out == ""
        model.train()
        returned = trainer.compute_loss(model, dict(first_batch), num_items_in_batch=3 * tokens)
        out = capsys.readouterr().out
        trainer.compute_loss(model, dict(first_batch), num_items_in_batch=3 * tokens)
    assert returned.item() == pytest.approx(loss / 3, rel=1e-4)
    assert printed_loss(out) == pytest.approx(loss, abs=1e-3) and WARNING in out
    assert capsys.readouterr().out == ""
