"""The output folder: one run per folder, locked while a run writes it, the final model moved in whole.

- ``check_output_dir`` (before anything is loaded): the folder must be a writable folder, not in use by
  another run, and hold no other run: a finished run or checkpoints are refused unless the run resumes
  from a checkpoint made with the same model and adapter settings, or ``--overwrite_output_dir`` says
  to replace them.
- ``lock_output_dir``: an exclusive ``flock`` on ``OUTPUT_DIR/.finetune.lock`` for the life of the
  process (the kernel drops it when the process dies, even by SIGKILL), so a second run into the same
  folder stops with one line instead of mixing its files with the first's.
- ``clear_previous_run`` (``--overwrite_output_dir``): removes the old run's model, adapter, state and
  checkpoints; other files are left alone.
- ``save_final_model``: the model is saved into a staging folder inside ``OUTPUT_DIR`` and its files
  moved in, ``config.json`` / ``adapter_config.json`` last: a kill during the save leaves no config
  beside truncated weights, and files of an older model that the new one does not have are removed first.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile

from ..cli import OutputDirError, check_output_path, flush_to_disk
from .safety import CHECKPOINT_RE, checkpoint_step, is_complete_checkpoint

LOCK_NAME = ".finetune.lock"
STAGING_NAME = ".final-model"
# What loaders look for first: moved in last, so a folder that has them has everything else.
MARKER_FILES = ("config.json", "adapter_config.json")
# Files of a finished run (a model or an adapter, and the state saved after it).
RUN_FILE_PATTERNS = ("config.json", "adapter_config.json", "generation_config.json", "model.safetensors",
                     "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                     "adapter_model.safetensors", "adapter_model.bin", "training_args.bin", "trainer_state.json")
# What the end of a run writes beside the model (--overwrite_output_dir removes them too).
RESULT_FILES = ("test_metrics.json", "test_predictions.jsonl", "training_curves.png", "all_results.json",
                "train_results.json", "eval_results.json", "check_prompts.json")
# A full fine-tune resumes only onto a model of the same type and shape.
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
_held_locks = []  # open lock files: the lock lasts as long as the file stays open


def run_files(folder: str) -> list[str]:
    """The files of a finished run at the top of ``folder``."""
    found = {path for pattern in RUN_FILE_PATTERNS for path in glob.glob(os.path.join(glob.escape(folder), pattern))}
    return sorted(found)


def checkpoints(folder: str) -> list[str]:
    """checkpoint-N folders, lowest N first."""
    names = [name for name in os.listdir(folder)
             if CHECKPOINT_RE.match(name) and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for name in sorted(names, key=checkpoint_step)]


def settings_of(folder: str) -> dict | None:
    """What a saved model or checkpoint was trained as: {"kind": "LoRA", lora_r, lora_alpha, lora_dropout,
    lora_target_modules, base} from adapter_config.json, {"kind": "full", SHAPE_KEYS...} from config.json;
    None if neither is readable."""
    for name in ("adapter_config.json", "config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if name == "adapter_config.json":
            targets = config.get("target_modules")
            return {"kind": "LoRA", "lora_r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                    "lora_dropout": config.get("lora_dropout"),
                    "lora_target_modules": sorted(targets) if isinstance(targets, list) else targets,
                    "base": config.get("base_model_name_or_path")}
        return {"kind": "full", **{key: config.get(key) for key in SHAPE_KEYS}}
    return None


def differences(saved: dict, wanted: dict) -> list[str]:
    """Settings in which a saved run differs from this one, as "name saved -> wanted"."""
    if saved["kind"] != wanted["kind"]:
        return [f"{saved['kind']} fine-tuning -> {wanted['kind']} fine-tuning"]
    found = []
    for key, value in wanted.items():
        old = saved.get(key)
        if key == "base":
            same = old is None or value is None or _same_model(old, value)
        else:
            same = value is None or old is None or old == value
        if not same:
            found.append(f"{key.replace('base', 'base model')} {old} -> {value}")
    return found


def _same_model(a: str, b: str) -> bool:
    return a == b or os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _take_lock(f) -> str | None:
    """Try to lock an open file: None when locked, "held" when another process holds it, else why the file
    system cannot lock it (some network and FUSE file systems have no flock)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return "held" if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else (e.strerror or str(e))
    return None


def is_locked(output_dir: str) -> bool:
    """Whether another process holds the folder's lock now (never, on a file system that cannot lock)."""
    path = os.path.join(output_dir, LOCK_NAME)
    if not os.path.isfile(path):
        return False
    with open(path, "a") as f:
        outcome = _take_lock(f)
        if outcome is None:
            fcntl.flock(f, fcntl.LOCK_UN)
    return outcome == "held"


def check_output_dir(output_dir: str, wanted: dict, resume_from: str | None, overwrite: bool,
                     check_lock: bool = True) -> None:
    """Raise OutputDirError when ``output_dir`` cannot take this run (see the module docstring).

    ``wanted``: this run's settings (as ``settings_of`` reports them); ``resume_from``: the resolved
    checkpoint folder, or None.
    """
    check_output_path(output_dir)
    flag = f"--output_dir {output_dir}"
    if check_lock and os.path.isdir(output_dir) and is_locked(output_dir):
        raise OutputDirError(f"{flag} is in use by another training run; wait for it to end or choose another folder")
    if resume_from:
        saved = settings_of(resume_from)
        changed = differences(saved, wanted) if saved else []
        if changed:
            raise OutputDirError(f"--resume_from_checkpoint {resume_from} was trained with other settings "
                                 f"({'; '.join(changed)}): resume with the checkpoint's settings, or start a new "
                                 "run in another --output_dir")
        return
    if overwrite or not os.path.isdir(output_dir):
        return
    replace = "choose another --output_dir, or pass --overwrite_output_dir to replace it"
    finished = run_files(output_dir)
    if finished:
        saved = settings_of(output_dir)
        what = f"a finished {saved['kind']} fine-tuning run" if saved else "a finished run"
        raise OutputDirError(f"{flag} already holds {what} ({os.path.basename(finished[0])}, ...): {replace}")
    found = [path for path in checkpoints(output_dir) if is_complete_checkpoint(path)]  # cut-off ones are rewritten
    if found:
        saved = settings_of(found[-1])
        changed = differences(saved, wanted) if saved else []
        names = ", ".join(os.path.basename(p) for p in found[-3:])
        if changed:
            raise OutputDirError(f"{flag} holds checkpoints ({names}) of a run with other settings "
                                 f"({'; '.join(changed)}): {replace}")
        raise OutputDirError(f"{flag} holds checkpoints ({names}) of an unfinished run: continue it with "
                             f"--resume_from_checkpoint true, {replace}")


def lock_output_dir(output_dir: str, log=print) -> None:
    """Hold an exclusive lock on ``output_dir`` until the process ends; OutputDirError if another run has it.
    On a file system that cannot lock files the run goes on, and says that nothing guards the folder."""
    os.makedirs(output_dir, exist_ok=True)
    f = open(os.path.join(output_dir, LOCK_NAME), "a")
    outcome = _take_lock(f)
    if outcome == "held":
        f.close()
        raise OutputDirError(f"--output_dir {output_dir} is in use by another training run; "
                             "wait for it to end or choose another folder")
    if outcome is not None:
        f.close()
        log(f"note: --output_dir {output_dir}: its file system cannot lock files ({outcome}); nothing stops "
            "a second run from writing into it at the same time")
        return
    _held_locks.append(f)


def unlock_output_dir(output_dir: str) -> None:
    """Release this process's lock on ``output_dir`` (a no-op if it holds none)."""
    path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))
    for f in [f for f in _held_locks if os.path.realpath(f.name) == path]:
        _held_locks.remove(f)
        f.close()  # closing the file releases the flock


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove an earlier run's model/adapter files, state and checkpoints (--overwrite_output_dir);
    returns what was removed."""
    if not os.path.isdir(output_dir):
        return []
    results = [os.path.join(output_dir, name) for name in RESULT_FILES
               if os.path.isfile(os.path.join(output_dir, name))]
    removed = run_files(output_dir) + results + checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return removed


def save_final_model(trainer) -> None:
    """``trainer.save_model()`` into a staging folder, then its files moved into ``output_dir``, markers last.

    Every process calls this (ZeRO-3 gathers the weights collectively); the ones that save (the first, or
    the first of each node with --save_on_each_node) move the files.
    """
    output_dir = trainer.args.output_dir
    staging = os.path.join(output_dir, STAGING_NAME)
    if trainer.args.should_save and os.path.isdir(staging):
        shutil.rmtree(staging)  # left by a save that was cut off
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        move_into(staging, output_dir)
    trainer.accelerator.wait_for_everyone()


def move_into(staging: str, output_dir: str) -> None:
    """Replace ``output_dir``'s model with the one in ``staging``: old markers and stale model files go
    first, then the new files by rename (flushed to disk first, as every file written into place is: cli.py),
    markers last; ``staging`` is removed."""
    flush_to_disk(staging)
    new = set(os.listdir(staging))
    for path in run_files(output_dir):
        name = os.path.basename(path)
        if name in MARKER_FILES or name not in new:
            os.remove(path)
    for name in sorted(new, key=lambda n: n in MARKER_FILES):  # markers last
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(error: BaseException, folder: str) -> str | None:
    """Why writing to ``folder`` failed for lack of space ("No space left on device", "File too large"),
    or None when ``error`` is something else. torch.save reports a full disk without an errno
    ("unexpected pos ..."), so when the error chain does not say, a 1 MiB test write in ``folder`` does."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in SPACE_ERRNOS:
            return os.strerror(error.errno)
        for code in SPACE_ERRNOS:
            if os.strerror(code) in str(error):
                return os.strerror(code)
        error = error.__cause__ or error.__context__
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in SPACE_ERRNOS:
            return os.strerror(e.errno)
    return None
