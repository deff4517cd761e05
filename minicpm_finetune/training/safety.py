"""Fault handling: which checkpoint to resume from, and stopping on a non-finite loss.

Resuming: ``--resume_from_checkpoint PATH``, or ``true`` / ``latest`` for the newest *complete*
checkpoint in ``--output_dir``. transformers writes ``checkpoint-N`` in place (model, optimizer,
scheduler, RNG states, then ``trainer_state.json`` last; under DeepSpeed after a barrier), and its
own ``get_last_checkpoint`` takes the highest N whether or not it was finished. Here a checkpoint
counts only when its ``trainer_state.json`` parses and records step N and its weight, optimizer,
scheduler and RNG files are whole (``is_whole_file``), so a folder cut off by a crash mid-save, or
whose files were truncated later (a full disk, a copy cut short), is never picked.

Signals: ``StopOnSignal`` turns Ctrl-C (SIGINT) and SIGTERM (``kill PID``, a job scheduler's stop) into the same
KeyboardInterrupt, so both end a run with the line naming the checkpoint to resume from.

Numerical faults: ``NonFiniteLossGuard`` checks each micro-batch's loss (on every process, agreed
with one all-reduce) and raises ``NonFiniteLossError`` before the optimizer applies a NaN/inf
gradient, so no checkpoint after the fault is written. (transformers' default would replace the
logged value and step on.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import zipfile

import torch
from transformers import TrainerCallback

from ..cli import ArgumentError, FinetuneError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LATEST = ("true", "latest", "last")
NOT_RESUMING = ("", "false", "none", "no")


class NonFiniteLossError(FinetuneError):
    """The training loss became NaN or infinite."""


def checkpoint_step(path: str) -> int | None:
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint folder whose trainer_state.json (written last) is readable and names its step, that
    holds model weights, and whose weight, optimizer, scheduler and RNG files are all whole."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    step = checkpoint_step(path)
    if step is not None and state.get("global_step") != step:
        return False
    files = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]
    has_weights = any(name.endswith((".safetensors", "model.bin")) or "model_states" in name
                      for name in map(os.path.basename, files))
    return has_weights and all(is_whole_file(f) for f in files)


def is_whole_file(path: str) -> bool:
    """Cheap structural check, reading only headers and ends: a .safetensors file is as long as its
    header says; a torch.save file (.pt/.pth/.bin, a zip) has its central directory. Other files pass."""
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            return size == 8 + header_length + max(ends, default=0)
        if path.endswith((".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile):
        return False
    return True


def latest_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """(the complete checkpoint with the highest step or None, the incomplete ones above it)."""
    if not os.path.isdir(output_dir):
        return None, []
    found = sorted(((checkpoint_step(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
                    if CHECKPOINT_RE.match(name) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    incomplete = []
    for _, path in found:
        if is_complete_checkpoint(path):
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder that ``--resume_from_checkpoint value`` means; ArgumentError if there is none."""
    if value is None or str(value).strip().lower() in NOT_RESUMING:
        return None
    if str(value).strip().lower() in LATEST:
        path, incomplete = latest_checkpoint(output_dir)
        if path is None:
            raise ArgumentError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in "
                             f"--output_dir {output_dir}")
        if int(os.environ.get("RANK", "0")) == 0:
            skipped = f" (skipping incomplete {', '.join(map(os.path.basename, incomplete))})" if incomplete else ""
            print(f"resuming from {path}{skipped}")
        return path
    if not os.path.isdir(value):
        raise ArgumentError(f"--resume_from_checkpoint {value}: folder not found")
    if not is_complete_checkpoint(value):
        raise ArgumentError(f"--resume_from_checkpoint {value}: incomplete checkpoint (no valid trainer_state.json, "
                         "or missing or truncated weight/optimizer files; it was probably cut off while being saved)")
    return value


class AlreadyTrained(Exception):
    """The checkpoint resumed from is at (or past) the last step: nothing is left to train."""


class NothingLeftToTrain(TrainerCallback):
    """Resumed at max_steps (a stop during the final save), the Trainer would train one step more: it checks for
    the end after each step, and max_steps that is not a whole number of epochs leaves the loop running. Stop
    before the first step instead, with the checkpoint's weights (and optimizer) already loaded."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained(f"resumed at step {state.global_step} of {state.max_steps}: nothing left to train")


class NonFiniteLossGuard:
    """Trainer mixin: stop with NonFiniteLossError when any process sees a NaN/inf loss.

    Checked after the backward pass of each micro-batch, before the optimizer step, so the weights
    and every checkpoint written so far stay finite. Costs one scalar all-reduce per micro-batch
    (the Trainer already reads the loss on the host each step for its own NaN filter).
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            step = self.state.global_step + 1
            local = loss.detach().float().mean().item()
            finite_here = torch.isfinite(torch.tensor(local))
            what = "loss is not finite on another process" if finite_here else f"loss is {local}"
            good, _ = latest_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it"
            raise NonFiniteLossError(
                f"{what} at step {step}: training stopped before the optimizer step; {kept}. "
                "Try a lower --learning_rate, bf16 instead of fp16, or check the data")
        return loss


class ProcessReport(TrainerCallback):
    """One line per process (not only the first) when training starts and ends: every node's log shows it trained."""

    def _say(self, args, state, what):
        print(f"process {args.process_index} of {args.world_size} (local rank {args.local_process_index}): "
              f"{what} at step {state.global_step}", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._say(args, state, "training starts")

    def on_train_end(self, args, state, control, **kwargs):
        self._say(args, state, "training finished")


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) and SIGTERM stop training by raising KeyboardInterrupt, while ``installed()``.

    The handler raises at once. Python drops an exception raised while it runs a destructor or a callback
    from C code ("Exception ignored in ..."), and training would then go on to the end; so the signal is
    also recorded and raised again when the step ends.
    """

    REASONS = {signal.SIGINT: ("interrupted (Ctrl-C)", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}

    def __init__(self):
        self.received = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        # A signal ignored when the run started stays ignored (a shell starts background jobs with SIGINT ignored).
        previous = {number: signal.signal(number, self._handle) for number in self.REASONS
                    if signal.getsignal(number) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _handle(self, number, frame):
        self.received = signal.Signals(number)
        raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            raise KeyboardInterrupt  # the handler's exception was dropped

    def reason(self) -> tuple[str, int]:
        """What stopped the run and its exit status (a KeyboardInterrupt from elsewhere counts as Ctrl-C)."""
        return self.REASONS[self.received or signal.SIGINT]
