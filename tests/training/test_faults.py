"""Faults: bad data, truncation, crash and resume, NaN losses, impossible arguments, output folders, Ctrl-C and
the disk, inference/export paths and encodings, the scripts' settings, the preview (docs/faults.md).

Each subprocess runs the real `python finetune.py` on the tiny model, on the CPU; runs are shared by
the tests that only read their results, to keep the number of start-ups small.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import QA, ROOT, conversation, run, write_jsonl
from minicpm_finetune.data.tokenizer import load_tokenizer

GOOD = conversation(*QA[0])


def finetune_cmd(model, train, dev, output_dir, *extra):
    return [sys.executable, "finetune.py", "--model_name_or_path", str(model), "--train_data_path", str(train),
            "--eval_data_path", str(dev), "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true", *map(str, extra)]


def assert_clean_failure(result, output_dir):
    """Non-zero exit, an error line, no Python traceback, nothing written."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(output_dir)


# --------------------------------------------------------------------------- 1. data checks

def bad_line(i):
    """A record without a reply."""
    return {"messages": [{"role": "user", "content": f"q{i}"}]}


@pytest.fixture(scope="module")
def bad_data_run(tmp_path_factory, tiny_model):
    """One run over a train, a validation and a test file holding every record-level fault."""
    folder = tmp_path_factory.mktemp("bad_data")
    user, reply = QA[1]
    records = [
        json.dumps(GOOD, ensure_ascii=False),                                                   # 1 good
        '{"messages": [{"role": "user", "content": "hi"}',                                      # 2 malformed
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),  # 3
        json.dumps({"prompt": user, "response": reply}, ensure_ascii=False),                    # 4 wrong format
        json.dumps({"messages": [{"role": "bot", "content": user}, {"role": "assistant", "content": reply}]},
                   ensure_ascii=False),                                                         # 5 unknown role
        json.dumps({"messages": [{"role": "assistant", "content": reply}, {"role": "user", "content": user}]},
                   ensure_ascii=False),                                                         # 6 out of order
        json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                                 {"role": "user", "content": user}]}, ensure_ascii=False),      # 7 ends with user
        json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "  "}]},
                   ensure_ascii=False),                                                         # 8 empty reply
        '"just a string"',                                                                      # 9 not an object
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": reply}]},
                   ensure_ascii=False),                                                         # 10 no content
    ]
    (folder / "train.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    # A JSON array: problems are named by item number; 25 more bad items to go past the 20 listed.
    items = [{"input": user, "output": reply}, {"input": user, "output": 3}] + [{"input": f"q{i}"} for i in range(25)]
    (folder / "dev.json").write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    (folder / "test.jsonl").write_bytes(json.dumps(GOOD, ensure_ascii=False).encode() + b'\n{"input": "\xff"}\n')
    out = folder / "out"
    result = run(finetune_cmd(tiny_model, folder / "train.jsonl", folder / "dev.json", out,
                              "--test_data_path", folder / "test.jsonl"))
    return folder, out, result


BAD_RECORDS = [
    ("train.jsonl:2:", "malformed JSON"),
    ("train.jsonl:3:", 'message 1: "content" must be a string'),
    ("train.jsonl:4:", 'missing "messages"'),
    ("train.jsonl:5:", "unknown role 'bot'"),
    ("train.jsonl:6:", "role 'assistant' out of order"),
    ("train.jsonl:7:", "does not end with an assistant reply"),
    ("train.jsonl:8:", "empty reply"),
    ("train.jsonl:9:", "record is not a JSON object"),
    ("train.jsonl:10:", 'message 1: "content" must be a string'),
    ("dev.json:2:", '"output" must be a string'),
    ("test.jsonl:2:", "not UTF-8"),
]
BAD_RECORD_IDS = ["malformed_json", "non_string_content", "wrong_format", "unknown_role", "out_of_order",
                  "ends_with_user", "empty_reply", "not_an_object", "missing_content", "array_item_bad_field",
                  "not_utf8"]


@pytest.mark.slow
@pytest.mark.parametrize("where, problem", BAD_RECORDS, ids=BAD_RECORD_IDS)
def test_bad_record_is_named_with_file_and_line(bad_data_run, where, problem):
    folder, out, result = bad_data_run
    assert_clean_failure(result, out)
    line = next((out for out in result.stderr.splitlines() if where in out), None)
    # Lines past the first 20 are counted, not listed; these cases are among the first 20.
    assert line is not None and problem in line, result.stderr
    assert str(folder) in line


@pytest.mark.slow
def test_all_files_checked_in_one_pass_first_20_listed(bad_data_run):
    _, out, result = bad_data_run
    assert_clean_failure(result, out)
    # An unreadable test file (listed first), 9 bad records in train, 26 in dev.
    assert "36 problem(s) in the data" in result.stderr
    listed = [line for line in result.stderr.splitlines() if ".json" in line and ":" in line]
    assert len(listed) == 20 and "test.jsonl:2: not UTF-8" in listed[0]
    assert 'dev.json:11: missing "output"' in listed[-1]
    assert "... and 16 more" in result.stderr
    assert "train.jsonl:1:" not in result.stderr  # the good record is not flagged


@pytest.mark.slow
def test_unreadable_files_stop_even_with_skip(tmp_path, tiny_model):
    """Empty file and malformed JSON array: whole files, never skipped."""
    (tmp_path / "train.jsonl").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "dev.json").write_text('[\n{"input": "a", "output": "b"},\n{"input": "a" "output": "b"}\n]')
    out = tmp_path / "out"
    result = run(finetune_cmd(tiny_model, tmp_path / "train.jsonl", tmp_path / "dev.json", out,
                              "--skip_bad_samples"))
    assert_clean_failure(result, out)
    assert f"{tmp_path}/train.jsonl: file is empty" in result.stderr
    assert f"{tmp_path}/dev.json:3: malformed JSON array" in result.stderr


@pytest.mark.slow
def test_skip_bad_samples_counts_duplicates_and_train_as_validation(tmp_path, tiny_model):
    records = [conversation(q, a) for q, a in QA]
    train = write_jsonl(tmp_path / "train.jsonl", records + records[:2] + [bad_line(0), {"messages": []}])
    dev = write_jsonl(tmp_path / "dev.jsonl", records)  # a copy of the training samples under another name
    out = tmp_path / "out"
    result = run(finetune_cmd(tiny_model, train, dev, out, "--skip_bad_samples", "--max_steps", 1,
                              "--save_strategy", "no"))
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert f"skipping 2 bad record(s) in {train}" in text
    assert f"{train} has 2 duplicated sample(s)" in text
    assert f"the validation data {dev} is the training data {train}" in text
    assert os.path.isfile(out / "model.safetensors")


def test_validation_overlap_is_counted(tmp_path):
    from minicpm_finetune.data import check_files

    records = [conversation(q, a) for q, a in QA]
    train = write_jsonl(tmp_path / "train.jsonl", records[:3])
    dev = write_jsonl(tmp_path / "dev.jsonl", records[2:])
    said = []
    check_files({"train": train, "eval": dev}, log=said.append)
    assert said == [f"warning: 1 of 2 validation sample(s) in {dev} are also in the training data {train}"]
    said.clear()
    check_files({"train": train, "eval": train}, log=said.append)
    assert "is the training data" in said[0]


# --------------------------------------------------------------------------- 2. truncation


@pytest.fixture(scope="module")
def tokenizer(tiny_model):

    return load_tokenizer(tiny_model)


def learned_text(tokenizer, ids, labels):
    """The learned tokens, as runs of text."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token  # labels are the input ids themselves (the model shifts)
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    if current:
        runs.append(tokenizer.decode(current))
    return runs


TWO_TURNS = [{"role": "system", "content": "你是助手"},
             {"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]},
             {"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": QA[1][1]}]


def test_truncation_masks_a_cut_reply_whole_and_keeps_finished_ones(tokenizer):
    from minicpm_finetune.data import encode

    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    full = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    first_end, second_end = [i for i, t in enumerate(full) if t == eos]  # each reply ends with eos
    assert second_end == len(full) - 1

    whole = encode(tokenizer, TWO_TURNS, tokenizer.eos_token, None)
    assert whole["input_ids"] == full and not whole["truncated"]
    assert learned_text(tokenizer, whole["input_ids"], whole["labels"]) == [QA[0][1] + "</s>", QA[1][1] + "</s>"]
    # Nothing before a reply is learned: system, user text, role markers and BOS are masked.
    assert whole["labels"][0] == -100

    # Room for everything: unchanged.
    assert encode(tokenizer, TWO_TURNS, "</s>", len(full))["labels"] == whole["labels"]
    # One token short: the second reply loses its eos and is masked whole; the first stays.
    cut = encode(tokenizer, TWO_TURNS, "</s>", len(full) - 1)
    assert cut["input_ids"] == full[:-1] and cut["truncated"] and cut["cut_replies"] == 1
    assert cut["labels"] == whole["labels"][: first_end + 1] + [-100] * (len(full) - 2 - first_end)
    # Cut right after the first reply's eos: the first reply is learned in full.
    at = encode(tokenizer, TWO_TURNS, "</s>", first_end + 1)
    assert at["input_ids"] == full[: first_end + 1] and at["labels"] == whole["labels"][: first_end + 1]
    assert learned_text(tokenizer, at["input_ids"], at["labels"]) == [QA[0][1] + "</s>"]
    # Cut inside the first reply: nothing left to learn.
    inside = encode(tokenizer, TWO_TURNS, "</s>", first_end)
    assert inside["num_learned"] == 0 and inside["cut_replies"] == 2


def test_samples_with_nothing_to_learn_are_skipped_and_counted(tokenizer):
    import datasets

    from minicpm_finetune.data import tokenize_dataset

    def length(messages):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(rendered, add_special_tokens=False).input_ids)

    first_end = length(TWO_TURNS[:3]) - 1  # the first reply's eos
    limit = first_end + 1
    long_reply = [{"role": "user", "content": QA[2][0]}, {"role": "assistant", "content": QA[2][1] * 12}]
    assert length(long_reply) > limit  # its only reply is cut: nothing left to learn
    conversations = datasets.Dataset.from_list([{"messages": TWO_TURNS}, {"messages": long_reply},
                                                {"messages": TWO_TURNS[1:3]}])
    dataset, stats = tokenize_dataset(conversations, tokenizer, limit)
    assert len(dataset) == stats.samples == 2 and stats.skipped == 1 and stats.truncated == 2
    assert [learned_text(tokenizer, row["input_ids"], row["labels"]) for row in dataset] == [[QA[0][1] + "</s>"]] * 2
    assert list(stats.lengths) == [length(TWO_TURNS), length(long_reply), length(TWO_TURNS[1:3])]
    summary = stats.summary("train")
    assert "2 truncated, 1 skipped (nothing left to learn)" in summary
    assert f"/{max(stats.lengths)}" in summary  # the longest sample before truncation


# --------------------------------------------------------------------------- 3. crash and resume


def test_latest_checkpoint_ignores_incomplete_ones(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    from minicpm_finetune.cli import ArgumentError
    from minicpm_finetune.training.safety import latest_checkpoint, resolve_resume

    import torch
    from safetensors.torch import save_file

    # (step, trainer_state.json, what else is wrong): whole files are real safetensors / torch.save zips.
    cases = [(2, {"global_step": 2}, None), (4, {"global_step": 4}, None), (6, None, None), (8, "{\"global_", None),
             (10, {"global_step": 3}, None), (12, {"global_step": 12}, "truncated weights"),
             (14, {"global_step": 14}, "truncated optimizer"), (16, {"global_step": 16}, "no weights")]
    for step, state, fault in cases:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if fault != "no weights":
            save_file({"w": torch.ones(64)}, str(folder / "model.safetensors"))
        torch.save({"state": {0: torch.ones(64)}}, folder / "optimizer.pt")
        if fault:
            name = "model.safetensors" if fault == "truncated weights" else "optimizer.pt"
            if fault != "no weights":
                data = (folder / name).read_bytes()
                (folder / name).write_bytes(data[: len(data) - 40])  # a copy or save cut short
        if state is not None:
            (folder / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    (tmp_path / "tmp-checkpoint-18").mkdir()
    # transformers takes the highest number, finished or not.
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-16")
    path, incomplete = latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "checkpoint-4")
    assert [os.path.basename(p) for p in incomplete] == [f"checkpoint-{n}" for n in (16, 14, 12, 10, 8, 6)]
    assert resolve_resume("latest", str(tmp_path)) == resolve_resume("true", str(tmp_path)) == path
    assert resolve_resume(None, str(tmp_path)) is None and resolve_resume("false", str(tmp_path)) is None
    with pytest.raises(ArgumentError, match="incomplete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))


def read_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def step_losses(folder):
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return {entry["step"]: entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry}


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_weights_and_losses(tmp_path, tiny_model, data_dir):
    """SIGKILL after a checkpoint, add half-written checkpoints, resume with `true`: same result as no crash."""
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(q, a) for q, a in QA] * 4)
    dev = data_dir / "dev.jsonl"
    # 16 samples / 2 = 8 steps an epoch: the run crosses an epoch; default (length-grouped, shuffled) order.
    args = ["--max_steps", 12, "--save_steps", 3, "--logging_steps", 1, "--per_device_train_batch_size", 2,
            "--learning_rate", 1e-3, "--seed", 7, "--eval_strategy", "no"]
    straight = tmp_path / "straight"
    result = run(finetune_cmd(tiny_model, train, dev, straight, *args))
    assert result.returncode == 0, result.stderr

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(finetune_cmd(tiny_model, train, dev, crashed, *args), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isfile(crashed / "checkpoint-3" / "trainer_state.json") and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed before it finished
    assert not os.path.exists(crashed / "model.safetensors")
    # Crashes while saving: one checkpoint without its trainer_state.json, one with it cut short.
    latest = max((p for p in os.listdir(crashed) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1]))
    shutil.copytree(crashed / latest, crashed / "checkpoint-1000", ignore=shutil.ignore_patterns("trainer_state.json"))
    shutil.copytree(crashed / latest, crashed / "checkpoint-999")
    (crashed / "checkpoint-999" / "trainer_state.json").write_text('{"global_step": 9')

    resumed = run(finetune_cmd(tiny_model, train, dev, crashed, *args, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr
    chosen = [line for line in resumed.stdout.splitlines() if line.startswith("resuming from")]
    assert chosen and "checkpoint-1000, checkpoint-999" in chosen[0] and "/checkpoint-" in chosen[0]

    a, b = read_weights(straight), read_weights(crashed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses, resumed_losses = step_losses(straight), step_losses(crashed)
    assert sorted(losses) == sorted(resumed_losses) == list(range(1, 13))
    assert all(abs(losses[s] - resumed_losses[s]) <= 1e-6 for s in losses)


@pytest.mark.slow
def test_a_resume_at_the_last_step_trains_nothing_more(tmp_path, tiny_model, data_dir):
    """A stop during the final save leaves the last checkpoint at max_steps; the recommended resume must save
    it and evaluate, not train step max_steps + 1 (max_steps 3 is not a whole number of 8-step epochs)."""
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(q, a) for q, a in QA] * 4)
    args = ["--max_steps", 3, "--save_steps", 3, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3,
            "--seed", 7, "--eval_strategy", "no", "--eval_generation", "false"]
    out = tmp_path / "out"
    assert run(finetune_cmd(tiny_model, train, data_dir / "dev.jsonl", out, *args)).returncode == 0
    for name in ("model.safetensors", "config.json", "trainer_state.json", "test_metrics.json"):
        os.remove(out / name)  # as if the run had stopped while saving the final model
    resumed = run(finetune_cmd(tiny_model, train, data_dir / "dev.jsonl", out, *args,
                               "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 3 of 3: nothing left to train; saving it as the final model" in resumed.stdout
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 3
    a, b = read_weights(out), read_weights(out / "checkpoint-3")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (out / "test_metrics.json").is_file()  # and evaluated


# --------------------------------------------------------------------------- 4. numerical faults


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    """The fault comes from the model: the embeddings of '☃' are inf; the 5th sample (in order) has one."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.tiny import build_tiny

    model_dir = build_tiny(str(tmp_path / "model"), [str(data_dir / "train.jsonl")], tie_word_embeddings=False)
    tokenizer = load_tokenizer(model_dir)
    poison = set(tokenizer("☃", add_special_tokens=False).input_ids) - {tokenizer.convert_tokens_to_ids("▁")}
    records = [conversation(q, a) for q, a in QA] + [conversation("☃ " + QA[0][0], QA[0][1]),
                                                     conversation(*QA[1])]
    for record in records[:4]:  # only the 5th sample contains the poisoned tokens
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert not poison & set(tokenizer(text, add_special_tokens=False).input_ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(poison)] = float("inf")
    model.save_pretrained(model_dir)

    train = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    result = run(finetune_cmd(model_dir, train, data_dir / "dev.jsonl", out, "--train_sampling_strategy",
                              "sequential", "--per_device_train_batch_size", 1, "--save_steps", 2,
                              "--eval_strategy", "no", "--max_steps", 6, "--learning_rate", 1e-3))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "loss is nan at step 5" in errors[0] and f"last good checkpoint is {out}/checkpoint-4" in errors[0]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert not os.path.exists(out / "model.safetensors")  # no final model from a broken run
    weights = read_weights(out / "checkpoint-4")
    embed = next(k for k in weights if "embed_tokens" in k)
    healthy = torch.ones(weights[embed].shape[0], dtype=torch.bool)
    healthy[sorted(poison)] = False
    assert all(torch.isfinite(w).all() for k, w in weights.items() if k != embed)
    assert torch.isfinite(weights[embed][healthy]).all()


# --------------------------------------------------------------------------- 7. impossible arguments


@pytest.fixture
def main_without_model(monkeypatch):
    """finetune.main with model and tokenizer loading replaced by a failure: errors must come first."""
    import finetune

    def never(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were rejected")

    monkeypatch.setattr(finetune, "load_model", never)
    monkeypatch.setattr(finetune, "load_chat_tokenizer", never)
    return finetune.main


IMPOSSIBLE = [
    ("lora flag without lora", ["--lora_r", "4"], "--lora_r given without --use_lora"),
    ("length beyond int32", ["--model_max_length", "2147483648"],
     "--model_max_length must be at most 2147483647, got 2147483648"),
    ("deepspeed config missing", ["--deepspeed", "nowhere.json"], "--deepspeed nowhere.json: config file not found"),
    ("deepspeed config broken", ["--deepspeed", "{tmp}/broken.json"], "not valid JSON"),
    ("adapter as base model", ["--use_lora", "--model_name_or_path", "{tmp}/adapter"], "is already a LoRA adapter"),
    ("train file missing", ["--train_data_path", "{tmp}/nope.jsonl"], "nope.jsonl: file not found"),
    ("eval on, no eval data", ["--eval_data_path", "", "--eval_strategy", "steps"], "--eval_data_path is required"),
    ("bf16 without bf16 hardware", ["--bf16"], "--bf16: no GPU with bf16 support"),
    ("fp16 and bf16", ["--bf16", "--fp16", "--use_cpu"], "At most one of fp16 and bf16"),
    ("resume path missing", ["--resume_from_checkpoint", "{tmp}/checkpoint-3"], "checkpoint-3: folder not found"),
    ("resume half-written", ["--resume_from_checkpoint", "{tmp}/out/checkpoint-2"], "incomplete checkpoint"),
    ("resume latest, none", ["--resume_from_checkpoint", "true", "--output_dir", "{tmp}/empty"],
     "no complete checkpoint-N folder"),
    ("model folder missing", ["--model_name_or_path", "{tmp}/no_model"], "no_model: folder not found"),
    ("early stopping without best model", ["--early_stopping_patience", "2", "--eval_strategy", "steps"],
     "--early_stopping_patience 2 needs a positive N and --load_best_model_at_end"),
    ("best-model metric never logged", ["--metric_for_best_model", "accuracy"],
     "--metric_for_best_model accuracy: evaluation logs loss, rouge-1, rouge-2, rouge-l, bleu-4"),
    ("ROUGE as best-model metric without generation", ["--metric_for_best_model", "rouge-l", "--eval_generation",
                                                       "false"], "scored on generated replies"),
    # Everything else knowable from the flags, the model's config.json and the output folder.
    ("bad number", ["--learning_rate", "fast"], "invalid float value: 'fast'"),
    ("learning rate not finite", ["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
    ("batch size 0", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
    ("report_to backend missing", ["--report_to", "wandb"], "--report_to wandb: wandb is not installed"),
    ("report_to unknown", ["--report_to", "wandbb"], "--report_to wandbb: unknown"),
    ("liger on minicpm", ["--model_name_or_path", "{model}", "--use_liger_kernel", "true"],
     "--use_liger_kernel has no effect on minicpm"),
    ("lora target misspelled",
     ["--use_lora", "--model_name_or_path", "{model}", "--lora_target_modules", "q_proj,v_prj"],
     "--lora_target_modules: v_prj matches no layer of this minicpm model; its layers: down_proj,"),
    ("lora target not a layer", ["--use_lora", "--model_name_or_path", "{model}", "--lora_target_modules", "mlp"],
     "mlp (a MiniCPMMLP, not a layer LoRA can wrap) matches no layer"),
    ("deepspeed config not an object", ["--deepspeed", "{tmp}/list.json"], "a DeepSpeed config is a JSON object"),
    ("output dir a file", ["--output_dir", "{tmp}/a_file"], "a_file is a file, not a folder"),
    ("output dir under a file", ["--output_dir", "{tmp}/a_file/out"], "a_file is a file, not a folder"),
    ("output dir not writable", ["--output_dir", "/sys/minicpm_out"],
     "--output_dir /sys/minicpm_out: cannot write in /sys ("),
    ("empty model folder", ["--model_name_or_path", "{tmp}/empty"], "no config.json in this folder"),
    ("resume with other lora settings", ["--use_lora", "--model_name_or_path", "{model}", "--lora_r", "16",
                                         "--resume_from_checkpoint", "{tmp}/lora/checkpoint-2"], "(lora_r 8 -> 16)"),
    ("resume full from lora",
     ["--model_name_or_path", "{model}", "--resume_from_checkpoint", "{tmp}/lora/checkpoint-2"],
     "(LoRA fine-tuning -> full fine-tuning)"),
    ("flash attention not installed", ["--attn_implementation", "flash_attention_2"],
     "--attn_implementation flash_attention_2 needs flash-attn: pip install flash-attn"),
    ("scorers not installed", ["--eval_generation", "true", "{block:rouge_chinese}"],
     "--eval_metrics rouge needs rouge-chinese: pip install rouge-chinese, or --eval_generation false"),
    ("deepspeed not installed", ["--deepspeed", "configs/ds_config_zero2.json", "{block:deepspeed}"],
     "--deepspeed needs DeepSpeed: pip install deepspeed"),
    ("output dir holds a finished run", ["--model_name_or_path", "{model}", "--output_dir", "{tmp}/lora"],
     "already holds a finished LoRA fine-tuning run"),
]


@pytest.mark.parametrize("case, extra, message", IMPOSSIBLE, ids=[case.replace(" ", "_").replace(",", "")
                                                                  for case, _, _ in IMPOSSIBLE])
def test_impossible_arguments_are_one_line_before_loading(tmp_path, data_dir, tiny_model, main_without_model, capsys,
                                                          monkeypatch, case, extra, message):
    import importlib.util

    import torch
    from safetensors.torch import save_file

    if "--bf16" in extra and "--fp16" not in extra and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("this machine supports bf16")
    if "wandb" in extra and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    if "flash_attention_2" in extra and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    for block in [a for a in extra if a.startswith("{block:")]:  # as if the package were not installed
        monkeypatch.setitem(sys.modules, block[len("{block:"):-1], None)
        extra = [a for a in extra if a != block]
    (tmp_path / "list.json").write_text('[{"zero_optimization": {"stage": 3}}]')
    (tmp_path / "a_file").write_text("not a folder")
    # A finished LoRA run (r=8) with a complete checkpoint, as finetune.py leaves them.
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["v_proj", "q_proj"],
            "base_model_name_or_path": tiny_model}
    for folder in (tmp_path / "lora", tmp_path / "lora" / "checkpoint-2"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(lora))
        save_file({"w": torch.ones(4)}, str(folder / "adapter_model.safetensors"))
    (tmp_path / "lora" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "broken.json").write_text('{"zero_optimization": {"stage": 3,}}')
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    argv = ["--model_name_or_path", str(tmp_path / "adapter"), "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none"] + [a.replace("{tmp}", str(tmp_path)).replace("{model}", tiny_model) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main_without_model(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


BAD_CONFIGS = [
    ("unknown key", "bad.yaml", "use_lora: true\nlerning_rate: 1.0e-4\n",
     "bad.yaml: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("not YAML", "bad.yaml", "use_lora: [true\n", "bad.yaml: not valid YAML ("),
    ("not JSON", "bad.json", '{"use_lora": true,}', "bad.json: not valid JSON ("),
    ("not a mapping", "bad.json", '["--use_lora"]', "bad.json: expected a mapping of flag names to values, got list"),
    ("list for a single value", "bad.yaml", "lora_target_modules: [q_proj, v_proj]\n",
     "bad.yaml: lora_target_modules takes one value, not a list"),
    ("missing", "nowhere.yaml", None, "nowhere.yaml: config file not found"),
    # A key given twice: YAML and JSON parsers keep the last value without a word.
    ("duplicate key YAML", "twice.yaml", "learning_rate: 1.0e-4\nuse_lora: true\nlearning_rate: 1.0e-3\n",
     "twice.yaml: 'learning_rate' is given twice (only one value can count; keep one)"),
    ("duplicate key JSON", "twice.json", '{"use_lora": true, "use_lora": false}',
     "twice.json: 'use_lora' is given twice (only one value can count; keep one)"),
]


@pytest.mark.parametrize("case, name, text, message", BAD_CONFIGS, ids=[c[0].replace(" ", "_") for c in BAD_CONFIGS])
def test_bad_config_file_is_one_line_before_loading(tmp_path, data_dir, main_without_model, capsys,
                                                    case, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / name), "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main_without_model(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}/{message}"), err
    assert not os.path.exists(tmp_path / "out")


def test_a_config_file_that_cannot_be_read_is_one_line():
    from minicpm_finetune.cli import ArgumentError
    from minicpm_finetune.training.arguments import read_config_file

    with pytest.raises(ArgumentError, match=r"^/proc/self/mem: cannot read \(Input/output error\)$"):
        read_config_file("/proc/self/mem")  # a file whose read fails (EIO), as a disk error would


@pytest.mark.slow
def test_the_demo_checks_its_folder_before_any_work(tmp_path, data_dir):
    (tmp_path / "a_file").write_text("not a folder")
    demo_dir = tmp_path / "a_file" / "demo"
    result = run(["bash", "lora_finetune.sh", "--demo"], env={"DEMO_DIR": str(demo_dir), "DATA_DIR": str(data_dir)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: DEMO_DIR {demo_dir}: cannot be created or written"]
    assert result.stdout == ""


def test_deepspeed_configs_use_dynamic_fp16_loss_scaling():
    """fp16 (GPUs without bf16) needs loss scaling: every DeepSpeed config scales dynamically (loss_scale 0)."""
    configs = [os.path.join(ROOT, "configs", name) for name in os.listdir(os.path.join(ROOT, "configs"))
               if name.startswith("ds_config")]
    assert configs
    for path in configs:
        with open(path) as f:
            fp16 = json.load(f)["fp16"]
        assert fp16["enabled"] == "auto" and fp16["loss_scale"] == 0, path


def test_model_max_length_beyond_the_models_positions_is_a_warning(tiny_model, data_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from minicpm_finetune.training.arguments import parse_args
    from minicpm_finetune.training.checks import check_against_model

    limit = AutoConfig.from_pretrained(tiny_model).max_position_embeddings
    model_args, _, training_args = parse_args([
        "--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
        "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"),
        "--report_to", "none", "--use_cpu", "--model_max_length", str(limit + 1)])
    check_against_model(model_args, training_args, AutoConfig.from_pretrained(tiny_model))  # finetune.main's step
    assert capsys.readouterr().out.splitlines() == [
        f"warning: --model_max_length {limit + 1} is beyond the model's {limit} positions; samples that long may "
        "train badly"]
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- 8. output folders, signals, the disk


def short_run(model, data_dir, output_dir, *extra):
    """4 steps, a checkpoint every 2, no evaluation during training, loss-only evaluation at the end."""
    return finetune_cmd(model, data_dir / "train.jsonl", data_dir / "dev.jsonl", output_dir, "--max_steps", 4,
                        "--save_steps", 2, "--eval_strategy", "no", "--eval_generation", "false", *extra)


def error_lines(result):
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def folder_state(folder):
    return {os.path.relpath(os.path.join(root, name), folder): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def two_runs_at_once(tmp_path_factory, tiny_model, data_dir):
    """Two identical LoRA runs started together into one folder: (output folder, [both results])."""
    out = tmp_path_factory.mktemp("two_runs") / "out"
    command = short_run(tiny_model, data_dir, out, "--use_lora")
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return out, results


@pytest.mark.slow
def test_two_runs_into_one_folder_one_trains_the_other_stops_in_one_line(two_runs_at_once):
    out, results = two_runs_at_once
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 2)
    errors = error_lines(loser)
    # Whether it lost the lock or came after the winner had finished, it says so and leaves the folder alone.
    assert len(errors) == 1 and (f"--output_dir {out} is in use by another training run" in errors[0]
                                 or f"--output_dir {out} already holds a finished LoRA" in errors[0]), errors
    assert "training starts" not in loser.stdout
    winner = next(r for r in results if r.returncode == 0)
    # No third-party notice in the run's own output: DeepSpeed's (imported by the Trainer) on machines without GPUs.
    assert "Setting accelerator to CPU" not in winner.stdout + winner.stderr
    assert "is deprecated" not in winner.stdout + winner.stderr  # transformers' warning when PEFT wraps the model
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 8


@pytest.mark.slow
def test_a_locked_folder_is_refused_before_loading(tmp_path, tiny_model, data_dir):
    from minicpm_finetune.training.outputs import lock_output_dir

    out = tmp_path / "out"
    lock_output_dir(str(out))  # this test process is "the other run"
    result = run(short_run(tiny_model, data_dir, out))
    assert result.returncode == 2
    # Refused before any data or model is read; and no third-party notice before the line (the real import order).
    assert result.stderr.splitlines() == [f"error: --output_dir {out} is in use by another training run; wait for it "
                                          "to end or choose another folder"]
    assert result.stdout == "" and os.listdir(out) == [".finetune.lock"]


@pytest.mark.slow
def test_a_folder_holding_another_run_is_refused_and_overwrite_replaces_it(two_runs_at_once, tiny_model, data_dir):
    """LoRA run in the folder: the same command again, a full run resuming from it, a LoRA run with another rank
    are refused (one line, before loading, nothing touched); --overwrite_output_dir replaces it whole."""
    out, _ = two_runs_at_once
    before = folder_state(out)
    refusals = [
        ((), f"--output_dir {out} already holds a finished LoRA fine-tuning run"),
        (("--resume_from_checkpoint", "true"),
         "was trained with other settings (LoRA fine-tuning -> full fine-tuning)"),
        (("--use_lora", "--lora_r", 4, "--resume_from_checkpoint", "true"),
         "was trained with other settings (lora_r 8 -> 4)"),
    ]
    for extra, message in refusals:
        result = run(short_run(tiny_model, data_dir, out, *extra))
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert folder_state(out) == before

    result = run(short_run(tiny_model, data_dir, out, "--overwrite_output_dir"))
    assert result.returncode == 0, result.stderr
    assert "--overwrite_output_dir: removed the earlier run's" in result.stdout
    names = set(os.listdir(out))
    assert not any(name.startswith("adapter_") for name in names)  # inference would load a stale adapter
    assert {"config.json", "model.safetensors", "trainer_state.json"} <= names and ".final-model" not in names
    assert all(os.path.isfile(out / c / "config.json") for c in ("checkpoint-2", "checkpoint-4"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def limited_file_size(limit):
    """preexec_fn: files larger than ``limit`` bytes cannot be written (EFBIG), as on a full disk."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_failed_final_save_leaves_no_config_beside_partial_weights(tmp_path, tiny_model, data_dir):
    """The final save cannot write the weights (the file-size limit is below their size): one line, exit 2, and
    the folder holds no config.json or weights (a loader would take them for a model)."""
    out = tmp_path / "out"
    weights = os.path.getsize(os.path.join(tiny_model, "model.safetensors"))
    command = short_run(tiny_model, data_dir, out, "--save_strategy", "no")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=limited_file_size(weights // 2))
    assert result.returncode == 2, result.stderr
    errors = error_lines(result)
    assert errors == [f"error: cannot write to {out} (File too large) at step 4: no complete checkpoint was saved "
                      "yet; run the command again to start over"]
    assert not {"config.json", "model.safetensors", "adapter_config.json"} & set(os.listdir(out))


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_how_to_resume(tmp_path, tiny_model, data_dir):
    """A small tmpfs holds one checkpoint and not two: one line naming the kept checkpoint, no traceback."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "out"
        result = run(short_run(tiny_model, data_dir, out))
        assert result.returncode == 2, result.stderr
        assert error_lines(result) == [
            f"error: cannot write to {out} (No space left on device) at step 4: kept {out}/checkpoint-2 (step 2); "
            "free some space, then continue with the same command and --resume_from_checkpoint true"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_signal_stops_training_even_when_its_first_exception_is_dropped():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from minicpm_finetune.training.safety import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    signals = StopOnSignal()
    with signals.installed():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises while this waits
        assert signals.reason() == ("terminated (SIGTERM)", 143)
        # Python dropped the exception (raised inside a destructor, say): the step's end raises it again.
        with pytest.raises(KeyboardInterrupt):
            signals.on_step_end(TrainingArguments("unused", report_to=[]), TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are the test process's own again
    assert StopOnSignal().reason() == ("interrupted (Ctrl-C)", 130)  # a KeyboardInterrupt from elsewhere
    # A signal ignored when the run starts stays ignored.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopOnSignal().installed():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, status, why", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                         (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, tiny_model, data_dir, signal_number, status, why):
    out = tmp_path / "out"
    command = short_run(tiny_model, data_dir, out, "--max_steps", 400, "--save_steps", 1, "--save_total_limit", 2)
    # As from a terminal: a test run started in the background (`pytest &`, CI in a job) would pass SIGINT on
    # ignored, and the run would rightly keep ignoring it.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    from minicpm_finetune.training.safety import latest_checkpoint

    deadline = time.time() + 300
    while not (os.path.isdir(out) and latest_checkpoint(str(out))[0]):  # a complete checkpoint, whichever
        assert time.time() < deadline and process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    result = subprocess.CompletedProcess(command, status, stdout, stderr)
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: {why} at step "), stderr
    kept = errors[0].split(" kept ")[1].split(" ")[0]
    assert kept.startswith(f"{out}/checkpoint-") and os.path.isfile(os.path.join(kept, "trainer_state.json"))
    assert errors[0].endswith("continue with the same command and --resume_from_checkpoint true")
    assert not os.path.exists(out / "config.json")
    # The way on that the line gives is accepted by the folder's checks.
    resumed = run(command + ["--resume_from_checkpoint", "true", "--max_steps", str(int(kept.rsplit("-", 1)[1]) + 1)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {kept}" in resumed.stdout


# --------------------------------------------------------------------------- 9. inference and export: paths, encodings


@pytest.mark.slow
@pytest.mark.parametrize("where, message", [("a_file/predictions.jsonl", "a_file is a file, not a folder"),
                                            (".", "is a folder, not a file")])
def test_inference_checks_its_output_path_before_loading(tmp_path, tiny_model, data_dir, where, message):
    (tmp_path / "a_file").write_text("not a folder")
    target = str(tmp_path / where)
    result = run([sys.executable, "inference.py", "--model_name_or_path", tiny_model, "--input_file",
                  str(data_dir / "dev.jsonl"), "--output_file", target])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output_file {target}") and message in lines[0], lines
    assert result.stdout == ""


@pytest.mark.slow
def test_an_empty_model_folder_is_one_line_in_inference_and_preview(tmp_path, data_dir):
    empty = tmp_path / "model"
    empty.mkdir()
    inference = run([sys.executable, "inference.py", "--model_name_or_path", str(empty), "--prompt", "hi"])
    assert inference.returncode == 2
    assert inference.stderr.splitlines() == [f"error: --model_name_or_path {empty}: no config.json in this folder "
                                             "(not a model folder, or its download is incomplete)"]
    preview = run([sys.executable, "-m", "minicpm_finetune.data", "--tokenizer", str(empty), "--data",
                   str(data_dir / "dev.jsonl")])
    assert preview.returncode == 2
    assert preview.stderr.splitlines() == [f"error: --tokenizer {empty}: no tokenizer files in this folder "
                                           "(tokenizer.json, tokenizer.model or tokenizer_config.json)"]


@pytest.mark.slow
def test_inference_takes_non_utf8_text_with_one_line(tiny_model):
    prompt = run_bytes([sys.executable, "inference.py", "--model_name_or_path", tiny_model, "--prompt", b"a\xffb"])
    assert prompt.returncode == 2
    assert prompt.stderr.splitlines() == [b"error: --prompt is not valid UTF-8 text (check the terminal's or the "
                                          b"script's encoding)"]
    # Chat: the bad message is refused and the chat goes on with the next one.
    chat = run_bytes([sys.executable, "inference.py", "--model_name_or_path", tiny_model, "--max_new_tokens", "4"],
                     stdin=b"hi \xff there\n" + QA[0][0].encode() + b"\n")
    assert chat.returncode == 2 and b"Traceback" not in chat.stderr
    assert [line for line in chat.stderr.splitlines() if line.startswith(b"error:")] == [
        b"error: this message is not valid UTF-8 text; not sent"]
    assert chat.stdout.count(b"Assistant: ") == 1


def run_bytes(args, stdin=b""):
    return subprocess.run(args, cwd=ROOT, input=stdin, capture_output=True, timeout=600)


@pytest.mark.parametrize("command", ["llama", "merge", "gguf"])
@pytest.mark.parametrize("where, message", [("a_file", "a_file is a file, not a folder"),
                                            ("a_file/out", "a_file is a file, not a folder")])
def test_export_checks_its_output_path_before_loading(tmp_path, tiny_model, capsys, monkeypatch, command, where,
                                                      message):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minicpm_finetune import export

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter))

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", never)
    (tmp_path / "a_file").write_text("not a folder")
    source = {"llama": ["--model", tiny_model], "merge": ["--adapter", str(adapter)],
              "gguf": ["--model", str(adapter)]}[command]
    capsys.readouterr()  # the adapter's loading bars
    with pytest.raises(SystemExit, match="^2$"):
        export.main([command, *source, "--output_dir", str(tmp_path / where)])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


# --------------------------------------------------------------------------- 10. the scripts' settings

BAD_SETTINGS = [
    ("sft_finetune.sh", {"NUM_GPUS": "two"}, "NUM_GPUS=two: expected a whole number of at least 1"),
    ("sft_finetune.sh", {"NUM_GPUS": "0"}, "NUM_GPUS=0: expected a whole number of at least 1"),
    ("sft_finetune.sh", {"MASTER_PORT": "29500x"}, "MASTER_PORT=29500x: expected a whole number of at least 1"),
    ("lora_finetune.sh", {"MODEL_MAX_LENGTH": "5O"}, "MODEL_MAX_LENGTH=5O: expected a whole number of at least 1"),
    ("lora_finetune.sh", {"PRECISION": "bf17"}, "PRECISION=bf17: expected bf16 or fp16"),
    ("sft_finetune.sh", {"DEVICE": "gpu"}, "DEVICE=gpu: expected auto or cpu"),
    ("lora_finetune.sh", {"GPU": "first"}, "GPU=first: expected a GPU number such as 0 (or a list: 0,1)"),
    ("lora_finetune.sh", {"MODEL_PATH": "./no-such-model"}, "MODEL_PATH ./no-such-model: folder not found"),
    ("lora_finetune.sh", {"DATA_DIR": "/no/such/dir"}, "DATA_DIR /no/such/dir: folder not found"),
    ("sft_finetune.sh", {"DS_CONFIG": "configs/nope.json"}, "DS_CONFIG configs/nope.json: file not found"),
    ("sft_finetune.sh", {"HOSTFILE": "/no/hostfile"}, "HOSTFILE /no/hostfile: file not found"),
    ("lora_finetune.sh", {"CONFIG": "configs/nope.yaml"}, "CONFIG configs/nope.yaml: file not found"),
    ("sft_finetune.sh", {"CONFIG": "configs/nope.yaml"}, "CONFIG configs/nope.yaml: file not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, env, message", BAD_SETTINGS,
                         ids=[f"{script.split('_')[0]}-{next(iter(env))}={next(iter(env.values()))}"
                              for script, env, _ in BAD_SETTINGS])
def test_scripts_refuse_a_bad_setting_in_one_line(tmp_path, tiny_model, data_dir, script, env, message):
    """Each setting is checked before anything starts; the others are good ones."""
    base = {"MODEL_PATH": tiny_model, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(tmp_path / "out")}
    result = run(["bash", script], env=dict(base, **env))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {message}"] and result.stdout == ""
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- 11. the data preview command


@pytest.mark.slow
def test_preview_uses_the_template_training_uses_and_reads_bad_files_in_one_line(tmp_path, tiny_model, data_dir):
    """A tokenizer without a chat template: the model type decides (MiniCPM3: ChatML), in the preview as in
    training. An unreadable file (an I/O error) and a bad record are one line and exit 2."""
    from transformers import AutoConfig

    from minicpm_finetune.data import encode, render_masked
    from minicpm_finetune.data.templates import end_of_turn_token
    from minicpm_finetune.data.tokenizer import load_chat_tokenizer

    model = tmp_path / "minicpm3_tokenizer"
    model.mkdir()
    shutil.copy(os.path.join(tiny_model, "tokenizer.model"), model)
    with open(os.path.join(tiny_model, "tokenizer_config.json"), encoding="utf-8") as f:
        settings = {key: value for key, value in json.load(f).items() if key != "chat_template"}
    (model / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")  # no chat template
    AutoConfig.for_model("minicpm3").save_pretrained(str(model))
    preview = run([sys.executable, "-m", "minicpm_finetune.data", "--tokenizer", str(model),
                   "--data", str(data_dir / "dev.jsonl")])
    assert preview.returncode == 0, preview.stderr
    tokenizer = load_chat_tokenizer(str(model))
    assert "<|im_start|>" in tokenizer.chat_template  # what training renders with
    first = encode(tokenizer, conversation(*QA[0])["messages"], end_of_turn_token(tokenizer), None)
    assert "masked):\n" + render_masked(tokenizer, first["input_ids"], first["labels"]) in preview.stdout

    unreadable = run([sys.executable, "-m", "minicpm_finetune.data", "--tokenizer", str(model),
                      "--data", "/proc/self/mem"])  # a file whose read fails (EIO)
    assert unreadable.returncode == 2
    assert [line for line in unreadable.stderr.splitlines() if line.strip()] == [
        "error: /proc/self/mem: cannot read (Input/output error)"]
