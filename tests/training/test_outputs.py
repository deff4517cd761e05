"""The output folder's checks, lock and clean-up, called directly (the end-to-end runs are in test_faults)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minicpm_finetune.cli import OutputDirError, check_output_path
from minicpm_finetune.training.outputs import (
    check_output_dir,
    clear_previous_run,
    differences,
    is_locked,
    lock_output_dir,
    settings_of,
    unlock_output_dir,
)

LORA = {"kind": "LoRA", "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target_modules": ["q_proj", "v_proj"],
        "base": "base-model"}
REPLACE = "choose another --output_dir, or pass --overwrite_output_dir to replace it"


def write_adapter(folder, r=8):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"r": r, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["v_proj", "q_proj"],
                   "base_model_name_or_path": "base-model"}, f)


def write_checkpoint(folder, step, r=8):
    write_adapter(folder, r)
    save_file({"w": torch.ones(4)}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)


def test_settings_of_an_adapter_and_of_a_full_model(tmp_path):
    write_adapter(tmp_path / "lora")
    assert settings_of(str(tmp_path / "lora")) == LORA  # target modules sorted
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text(json.dumps(
        {"model_type": "minicpm", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300, "other": 1}))
    assert settings_of(str(tmp_path / "full")) == {"kind": "full", "model_type": "minicpm", "hidden_size": 64,
                                                   "num_hidden_layers": 2, "vocab_size": 300}
    assert settings_of(str(tmp_path)) is None


def test_differences_name_each_changed_setting(tmp_path):
    assert differences(LORA, dict(LORA, lora_r=16, lora_alpha=None)) == ["lora_r 8 -> 16"]  # None: not set
    assert differences(LORA, {"kind": "full"}) == ["LoRA fine-tuning -> full fine-tuning"]
    (tmp_path / "base").mkdir()
    saved = dict(LORA, base=str(tmp_path / "base"))
    assert differences(saved, dict(saved, base=str(tmp_path / "." / "base"))) == []  # the same folder
    assert differences(saved, dict(saved, base="other")) == [f"base model {tmp_path / 'base'} -> other"]


def test_a_finished_run_is_refused_unless_overwritten(tmp_path):
    write_adapter(tmp_path)
    with pytest.raises(OutputDirError) as error:
        check_output_dir(str(tmp_path), LORA, None, overwrite=False)
    assert str(error.value) == (f"--output_dir {tmp_path} already holds a finished LoRA fine-tuning run "
                                f"(adapter_config.json, ...): {REPLACE}")
    check_output_dir(str(tmp_path), LORA, None, overwrite=True)
    check_output_dir(str(tmp_path / "new"), LORA, None, overwrite=False)


def test_checkpoints_say_resume_or_name_the_changed_settings(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-2", 2)
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    (tmp_path / "checkpoint-6").mkdir()  # cut off: rewritten, not counted
    with pytest.raises(OutputDirError) as error:
        check_output_dir(str(tmp_path), LORA, None, overwrite=False)
    assert str(error.value) == (f"--output_dir {tmp_path} holds checkpoints (checkpoint-2, checkpoint-4) of an "
                                f"unfinished run: continue it with --resume_from_checkpoint true, {REPLACE}")
    with pytest.raises(OutputDirError, match=r"of a run with other settings \(lora_r 8 -> 4\)"):
        check_output_dir(str(tmp_path), dict(LORA, lora_r=4), None, overwrite=False)
    check_output_dir(str(tmp_path), LORA, str(tmp_path / "checkpoint-4"), overwrite=False)  # resuming it
    with pytest.raises(OutputDirError, match=r"checkpoint-4 was trained with other settings \(lora_r 8 -> 4\)"):
        check_output_dir(str(tmp_path), dict(LORA, lora_r=4), str(tmp_path / "checkpoint-4"), overwrite=False)


def test_output_path_must_be_a_writable_folder_or_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputDirError, match=r"^--output_dir .*a_file is a file, not a folder$"):
        check_output_path(str(tmp_path / "a_file"))
    with pytest.raises(OutputDirError, match=r"^--output_dir .*a_file/out: .*a_file is a file, not a folder$"):
        check_output_path(str(tmp_path / "a_file" / "out"))
    with pytest.raises(OutputDirError, match=r"^--output_file .* is a folder, not a file$"):
        check_output_path(str(tmp_path), "--output_file", folder=False)
    check_output_path(str(tmp_path / "new" / "deeper"))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # checking writes nothing


def test_lock_is_exclusive_until_released(tmp_path):
    folder = str(tmp_path / "run")
    assert not is_locked(folder)
    lock_output_dir(folder)
    try:
        assert is_locked(folder)  # a second open file description conflicts, as another process would
        with pytest.raises(OutputDirError, match="is in use by another training run"):
            lock_output_dir(folder)
        with pytest.raises(OutputDirError, match="is in use by another training run"):
            check_output_dir(folder, LORA, None, overwrite=True)
    finally:
        unlock_output_dir(folder)
    assert not is_locked(folder)
    check_output_dir(folder, LORA, None, overwrite=False)


def test_a_file_system_that_cannot_lock_is_said_and_not_taken_for_another_run(tmp_path, monkeypatch):
    """Some network and FUSE file systems have no flock: the run goes on with a note, never "in use"."""
    import errno
    import fcntl

    def no_flock(f, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    folder = str(tmp_path / "run")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    said = []
    lock_output_dir(folder, log=said.append)
    assert said == [f"note: --output_dir {folder}: its file system cannot lock files (No locks available); "
                    "nothing stops a second run from writing into it at the same time"]
    assert not is_locked(folder)
    check_output_dir(folder, LORA, None, overwrite=False)  # not "in use by another training run"


def test_overwrite_clears_the_old_run_and_keeps_other_files(tmp_path):
    write_adapter(tmp_path)
    write_checkpoint(tmp_path / "checkpoint-2", 2)
    for name in ("adapter_model.safetensors", "trainer_state.json", "test_metrics.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = clear_previous_run(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "test_metrics.json", "trainer_state.json"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert clear_previous_run(str(tmp_path / "missing")) == []


def test_an_output_name_that_is_not_utf8_is_refused_before_any_work(tmp_path):
    """Such a name (a shell's bytes, decoded with surrogate escapes) trained to the end, then no save could name
    its files: the model was lost."""
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    with pytest.raises(OutputDirError, match=r"^--output_dir b'.*/out\\xff': the name is not valid UTF-8"):
        check_output_path(name)
