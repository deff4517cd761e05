"""DPO (--stage dpo): preference formats, masks, bad records, and training on the tiny model (LoRA and full):
reward accuracy and margin go up, the loss is the hand-computed one, and the saved output prefers the chosen replies."""

import json

import pytest
import torch
from conftest import QA, write_jsonl
from transformers import AutoModelForCausalLM

import finetune
from minicpm_finetune.data import IGNORE_INDEX, DataError, FileCheck
from minicpm_finetune.data import main as data_command
from minicpm_finetune.evaluation.prompts import prompt_ids
from minicpm_finetune.data.preference import (PreferenceCollator, check_preference_file, check_preference_files,
                                         encode_pair, to_pair, tokenize_pairs)
from minicpm_finetune.data.templates import end_of_turn_token
from minicpm_finetune.data.tokenizer import load_tokenizer

# A learnable preference set: each question prefers its own answer to the next question's.
PAIRS = [(q, a, QA[(i + 1) % len(QA)][1]) for i, (q, a) in enumerate(QA)]


def trl_record(question, chosen, rejected):
    return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preferences")
    records = [trl_record(*pair) for pair in PAIRS]
    write_jsonl(folder / "train.jsonl", records * 4)
    write_jsonl(folder / "dev.jsonl", records)
    return folder


# --------------------------------------------------------------------------- formats and masks

HISTORY_PROMPT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "a1"}, {"role": "user", "content": "instr\nq2"}]


@pytest.mark.parametrize("record, expected_format", [
    ({"system": "sys", "history": [["q1", "a1"]], "instruction": "instr", "input": "q2", "chosen": "good",
      "rejected": "bad"}, "minicpm"),
    ({"messages": HISTORY_PROMPT, "chosen": "good", "rejected": "bad"}, "messages"),
    ({"prompt": HISTORY_PROMPT, "chosen": [{"role": "assistant", "content": "good"}],
      "rejected": [{"role": "assistant", "content": "bad"}]}, "trl"),
    ({"chosen": HISTORY_PROMPT + [{"role": "assistant", "content": "good"}],  # TRL's implicit prompt
      "rejected": HISTORY_PROMPT + [{"role": "assistant", "content": "bad"}]}, "trl"),
], ids=["minicpm", "messages", "trl_conversational", "trl_implicit_prompt"])
def test_every_format_gives_the_same_pair(tmp_path, record, expected_format):
    check = check_preference_file(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert check.data_format == expected_format and not check.problems
    assert check.records == [(1, {"prompt": HISTORY_PROMPT, "chosen": "good", "rejected": "bad"})]


def test_trl_standard_strings_are_one_user_turn():
    assert to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, "trl") == \
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_chatml_model"])
def test_only_the_final_reply_and_its_end_of_turn_are_scored(request, model_fixture):
    tokenizer = load_tokenizer(request.getfixturevalue(model_fixture))
    pair = to_pair({"messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]},
                                 {"role": "user", "content": QA[1][0]}], "chosen": QA[1][1], "rejected": QA[2][1]},
                   "messages")
    end_of_turn = end_of_turn_token(tokenizer)
    row = encode_pair(tokenizer, pair, end_of_turn, None)
    prompt = prompt_ids(tokenizer, pair["prompt"])  # what inference feeds before the reply
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        text = tokenizer.apply_chat_template(pair["prompt"] + [{"role": "assistant", "content": pair[side]}],
                                             tokenize=False)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the SFT rendering, whole
        assert ids[:len(prompt)] == prompt
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert scored == list(range(len(prompt), scored[-1] + 1))  # one run, right after the prompt
        assert [labels[i] for i in scored] == ids[len(prompt):scored[-1] + 1]
        assert ids[scored[-1]] == eot_id  # the end-of-turn is scored ...
        assert tokenizer.decode(ids[len(prompt):scored[-1]]).strip() == pair[side]  # ... after exactly the reply
        assert all(label == IGNORE_INDEX for label in labels[scored[-1] + 1:])  # chatml's trailing newline is not
    assert row["length"] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))

    batch = PreferenceCollator(tokenizer.pad_token_id)([row, row])
    width = row["length"]
    assert batch["input_ids"].shape == (4, width)  # chosen, chosen, rejected, rejected
    for k, side in enumerate(("chosen", "chosen", "rejected", "rejected")):
        n = len(row[f"{side}_input_ids"])
        assert batch["input_ids"][k, :n].tolist() == row[f"{side}_input_ids"]
        assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (width - n)
        assert batch["completion_mask"][k].tolist() == [int(x != IGNORE_INDEX) for x in row[f"{side}_labels"]] + \
            [0] * (width - n)


def test_pairs_that_do_not_fit_are_dropped_not_cut(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    check = FileCheck("p", records=[(i + 1, to_pair(trl_record(*pair), "trl")) for i, pair in enumerate(PAIRS)])
    lengths = sorted(encode_pair(tokenizer, p, end_of_turn_token(tokenizer), None)["length"] for _, p in check.records)
    dataset, stats = tokenize_pairs(check, tokenizer, lengths[1])  # room for the two shortest only
    assert (len(dataset), stats.pairs, stats.dropped) == (2, 2, 2)
    assert max(dataset["length"]) <= lengths[1] and "2 dropped" in stats.summary("p", lengths[1])


def test_bad_preference_records_are_named_with_file_and_record(tmp_path, tiny_model, preference_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps(trl_record(*PAIRS[0]), ensure_ascii=False),
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
        "{not json",
        json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}),
        json.dumps({"prompt": "q", "chosen": "a"}),
        json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
        # Text the format does not read is refused, as in SFT data, not dropped.
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "system": "be brief"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "", "tool_calls": [
                                   {"type": "function", "function": {"name": "f", "arguments": {}}}]},
                               {"role": "tool", "content": "r"}, {"role": "user", "content": "and?"}],
                    "chosen": "a", "rejected": "b"}),
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--stage", "dpo", "--model_name_or_path", tiny_model, "--train_data_path", str(bad),
                       "--eval_data_path", str(preference_dir / "dev.jsonl"), "--output_dir", str(out), "--use_cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 8 problem(s) in the preference data:\n")
    for line in (f'{bad}:2: "chosen" and "rejected" are the same reply (nothing to prefer)',
                 f"{bad}:3: malformed JSON",
                 f"{bad}:4: the prompt does not end with a user turn",
                 f'{bad}:5: empty "rejected" reply',
                 f'{bad}:6: missing "rejected"',
                 f'{bad}:7: "chosen" must be one assistant message (or a string)',
                 f'{bad}:8: key "system" is not read by the trl format, its text would be lost',
                 f"{bad}:9: the prompt holds a tool call or result: preference pairs take plain turns only"):
        assert line in err, err
    assert not out.exists()  # nothing half-written


def test_sft_data_given_to_dpo_is_named(data_dir):
    with pytest.raises(DataError, match=r"train.jsonl:1: not a preference record"):
        check_preference_files({"train": str(data_dir / "train.jsonl")})


def test_data_command_previews_pairs_with_the_scored_spans_of_both_replies(tiny_model, preference_dir, capsys):
    assert data_command(["--tokenizer", tiny_model, "--data", str(preference_dir / "dev.jsonl")]) == 0
    out = capsys.readouterr().out
    q, chosen, rejected = PAIRS[0]
    assert "4 preference pairs" in out and "(trl format)" in out
    assert f"chosen: <s><用户>{q}<AI>[[{chosen}</s>]]" in out
    assert f"rejected: <s><用户>{q}<AI>[[{rejected}</s>]]" in out


# --------------------------------------------------------------------------- training


def sequence_logps(model, batch):
    """Sum of log-probabilities of the scored tokens, per row, from the model's own logits (MiniCPM scaling
    included): the hand computation TRL's fused head has to match."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].bool()
    return (logps * mask).sum(-1), logps, mask


def dpo(tiny_model, preference_dir, output_dir, *extra):
    argv = ["--stage", "dpo", "--model_name_or_path", tiny_model, "--train_data_path",
            str(preference_dir / "train.jsonl"), "--eval_data_path", str(preference_dir / "dev.jsonl"),
            "--output_dir", str(output_dir), "--use_cpu", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "4", "--max_steps", "8", "--lr_scheduler_type", "constant",
            "--logging_steps", "4", "--eval_strategy",
            "steps", "--eval_steps", "8", "--eval_on_start", "true", "--save_strategy", "no", "--disable_tqdm", "true",
            "--report_to", "none", "--seed", "0", *extra]
    return finetune.main(argv)


def evaluations(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [e for e in history if "eval_rewards/accuracies" in e]


def assert_rewards_rose(output_dir):
    first, *_, last = evaluations(output_dir)
    assert first["step"] == 0 and first["eval_rewards/accuracies"] == 0.0  # policy == reference: no preference
    assert abs(first["eval_rewards/margins"]) < 1e-6
    assert last["eval_rewards/accuracies"] == 1.0 and last["eval_rewards/margins"] > 0.1, last
    test = json.loads((output_dir / "test_metrics.json").read_text())
    for key in ("accuracies", "margins", "chosen", "rejected"):
        assert test[f"test_rewards/{key}"] == pytest.approx(last[f"eval_rewards/{key}"], abs=1e-5)
    assert not any(key.startswith("eval_") for key in test), test  # the test split's metrics are test_*
    assert (output_dir / "training_curves.png").is_file()
    return test


@pytest.mark.slow
def test_dpo_with_lora_and_sft_term(tmp_path, tiny_model, preference_dir):
    out = tmp_path / "lora"
    beta, sft_weight = 0.5, 0.5
    trainer = dpo(tiny_model, preference_dir, out, "--use_lora", "--learning_rate", "2e-2",
                  "--dpo_beta", str(beta), "--sft_loss_weight", str(sft_weight))
    test = assert_rewards_rose(out)
    assert not (out / "model.safetensors").exists()  # only the adapter
    assert set(trainer.model.peft_config) == {"default"} and not (out / "ref").exists()  # no reference copy

    # The trainer's loss on a batch is the hand-computed DPO + SFT loss, the reference being the adapter off.
    rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    batch = PreferenceCollator(trainer.processing_class.pad_token_id)(rows)
    model = trainer.model.eval()
    policy, token_logps, mask = sequence_logps(model, batch)
    with model.disable_adapter():
        reference, _, _ = sequence_logps(model, batch)
    chosen, rejected = (policy - reference).chunk(2)
    n = len(rows)
    expected = (-torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
                - sft_weight * token_logps[:n][mask[:n]].mean())
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)

    # The saved adapter loads over the base model and prefers every chosen reply; its rewards are the reported ones.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    reference, _, _ = sequence_logps(base, batch)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    policy, _, _ = sequence_logps(loaded, batch)
    rewards = beta * (policy - reference)
    chosen, rejected = rewards.chunk(2)
    assert (chosen > rejected).all(), (chosen, rejected)
    assert (chosen - rejected).mean().item() == pytest.approx(test["test_rewards/margins"], rel=1e-3)


@pytest.mark.slow
def test_dpo_full_fine_tuning(tmp_path, tiny_model, preference_dir):
    out = tmp_path / "full"
    trainer = dpo(tiny_model, preference_dir, out, "--learning_rate", "5e-3")
    assert_rewards_rose(out)
    rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    batch = PreferenceCollator(trainer.processing_class.pad_token_id)(rows)
    reference, _, _ = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), batch)
    policy, _, _ = sequence_logps(AutoModelForCausalLM.from_pretrained(out).eval(), batch)
    chosen, rejected = (policy - reference).chunk(2)
    assert (chosen > rejected).all(), (chosen, rejected)
    assert load_tokenizer(out).chat_template == trainer.processing_class.chat_template


def test_trl_fused_head_scores_minicpm_scaled_logits(tiny_model):
    """TRL computes log-probs from hidden states @ lm_head itself; MiniCPM divides the hidden states by
    hidden_size / dim_model_base first (config.logits_scaling tells TRL). Without it the rewards are wrong."""
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert model.config.logits_scaling == model.config.hidden_size / model.config.dim_model_base != 1
    ids = load_tokenizer(tiny_model)(QA[0][1], return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
    _, expected, _ = sequence_logps(model, batch)
    add_fused_lm_head(model)
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("deepspeed"), reason="deepspeed launcher not installed")
def test_dpo_full_under_zero3_on_two_processes_through_the_script(tmp_path, tiny_model, preference_dir):
    """The README's command (sft_finetune.sh --stage dpo) on two CPU processes, ZeRO-3: parameters and the
    reference copy sharded; rewards rise and the gathered model prefers the chosen replies."""
    import re
    import socket

    from conftest import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "zero3"
    env = dict(MODEL_PATH=tiny_model, DATA_DIR=str(preference_dir), OUTPUT_DIR=str(out), NUM_GPUS="2",
               MASTER_PORT=port, DS_CONFIG="configs/ds_config_zero3.json")
    result = run(["bash", "sft_finetune.sh", "--stage", "dpo", "--max_steps", "8", "--learning_rate", "5e-3",
                  "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
                  "--logging_steps", "4", "--eval_steps", "8", "--eval_on_start", "true",
                  "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"], env=env, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    for rank in (0, 1):
        assert re.search(f"process {rank} of 2 .*: training finished at step 8", log), log[-3000:]
    assert_rewards_rose(out)
    tokenizer = load_tokenizer(out)
    rows = tokenize_pairs(check_preference_file(str(preference_dir / "dev.jsonl")), tokenizer, None)[0]
    batch = PreferenceCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    reference, _, _ = sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), batch)
    policy, _, _ = sequence_logps(AutoModelForCausalLM.from_pretrained(out).eval(), batch)
    chosen, rejected = (policy - reference).chunk(2)
    assert (chosen > rejected).all(), (chosen, rejected)


@pytest.mark.slow
def test_demo_preference_sample_pairs_each_prompt_with_its_own_reply(tmp_path, data_dir):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "pref"
    result = subprocess.run([sys.executable, "scripts/make_preference_sample.py", str(data_dir), str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    check = check_preference_file(str(out / "dev.jsonl"))
    assert check.data_format == "messages" and not check.problems
    replies = {q: a for q, a in QA}
    assert len(check.records) == len(QA)
    for _, pair in check.records:
        question = pair["prompt"][-1]["content"]
        assert pair["chosen"] == replies[question]
        assert pair["rejected"] in replies.values() and pair["rejected"] != pair["chosen"]
