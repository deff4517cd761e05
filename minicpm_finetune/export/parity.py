"""The parity gate of every export and merge: the result, loaded back before it is moved into place, must
behave like its source on a handful of prompts.

Prompts: those stored with the run (``check_prompts.json`` in the source folder: the first prompts of the
training data, as message lists), else ``BUILTIN_PROMPTS``. Each is rendered with the chat template trained
with (a generation prompt after it) and tokenized by training's encoder: the reference ids.

Reference: the source in fp32 (a LoRA adapter unmerged, on its fp32 base): logits at every position and a
greedy continuation of ``NEW_TOKENS`` tokens (stopping at the end-of-turn token or EOS).

Result: a model folder is loaded back, its weights upcast to fp32 (so the check measures what the file holds,
not the arithmetic of a CPU in bf16), and its own tokenizer and template must give the reference ids; a GGUF
file is run by llama.cpp (``llama-cpp-python``, an optional extra; fp32 KV cache), which tokenizes the rendered
text itself. The command fails when max |logit difference| exceeds the outtype's tolerance, relative to the
largest reference logit (at least 1), or when the ids differ; greedy continuations are counted, not judged
(near ties may flip in lower precisions).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..cli import FinetuneError
from ..data.templates import stop_token_ids

PROMPTS_FILE = "check_prompts.json"
MAX_PROMPTS = 4
NEW_TOKENS = 8
BUILTIN_PROMPTS = ("你好，请介绍一下你自己。", "类型#裙*颜色#红色*风格#文艺", "What is two plus two?",
                   "写一句广告语：<br/>简约、显瘦，价格299元！")
# max |logit difference| allowed, relative to max(1, largest |reference logit|), by the result's storage type.
# Measured on the tiny model through llama.cpp (docs/deploy.md), as fractions of that scale: f32 1.3e-6, f16 1.2e-3,
# bf16 1.1e-2, q8_0 5e-2; a broken export (a wrong layout, a scaling left out) is off by about the scale itself.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2, "f32": 1e-4, "f16": 2e-2, "bf16": 6e-2,
             "q8_0": 2e-1}
SKIPPED_GGUF = ("parity: skipped: llama-cpp-python not installed (pip install \"minicpm-finetune[gguf-check]\" to run "
                "the GGUF file through llama.cpp)")


class ParityError(FinetuneError):
    """An export that does not behave like its source; nothing was written."""


def check_prompts(*folders: str) -> tuple[list[list[dict]], str]:
    """The prompts (message lists) to check with and where they come from: the first folder holding
    PROMPTS_FILE, else the built-in ones."""
    for folder in folders:
        path = os.path.join(folder, PROMPTS_FILE)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    prompts = json.load(f)
            except (OSError, ValueError) as err:
                raise ParityError(f"cannot read {path}: {err}") from None
            if prompts:
                return prompts[:MAX_PROMPTS], f"the run's {PROMPTS_FILE}"
    return [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS], "built-in prompts"


def save_check_prompts(output_dir: str, prompts: list[list[dict]]) -> None:
    """Store the first prompts of the training data with a run, for the gate of its later exports."""
    from ..cli import write_atomic

    if prompts:
        write_atomic(os.path.join(output_dir, PROMPTS_FILE),
                     json.dumps(list(prompts)[:MAX_PROMPTS], ensure_ascii=False, indent=1) + "\n")


def rendered_ids(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The prompt's text under the tokenizer's chat template and training's ids for it."""
    from ..data.encoding import get_encoder

    encoder = get_encoder(tokenizer)
    rendered = encoder.render(messages, generation_prompt=True)
    return rendered.text, list(encoder.token_ids(rendered))


class TransformersRunner:
    """Logits and greedy continuations of a transformers model, in fp32."""

    def __init__(self, model, stop: list[int]):
        self.model, self.stop = model.float().eval(), stop

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def greedy(self, ids: list[int], count: int = NEW_TOKENS) -> list[int]:
        import torch

        out = []
        with torch.no_grad():
            for _ in range(count):  # no KV cache: a handful of short prompts, and the same for every model type
                token = int(self.model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if token in self.stop:
                    break
                out.append(token)
        return out


class LlamaCppRunner:
    """The same through llama.cpp on a GGUF file."""

    def __init__(self, path: str, stop: list[int], context: int):
        from llama_cpp import GGML_TYPE_F32, Llama

        self.stop = stop
        self.llm = Llama(model_path=path, n_ctx=context, logits_all=True, verbose=False, seed=0,
                         type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # llama.cpp's default f16 cache costs 1e-3

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], count: int = NEW_TOKENS) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(count):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in self.stop:
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()


@dataclass
class Reference:
    """What the source does on the check prompts."""

    origin: str
    prompts: list[list[dict]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)


def reference(model, tokenizer, prompts: list[list[dict]], origin: str) -> Reference:
    """Run the source (any dtype; computed in fp32) on the prompts."""
    runner = TransformersRunner(model, stop_token_ids(tokenizer))
    ref = Reference(origin, list(prompts))
    for messages in prompts:
        text, ids = rendered_ids(tokenizer, messages)
        ref.texts.append(text)
        ref.ids.append(ids)
        ref.logits.append(runner.logits(ids))
        ref.greedy.append(runner.greedy(ids))
    return ref


def compare(ref: Reference, runner, result_ids: list[list[int]], storage: str, what: str, target: str) -> str:
    """The parity line of ``runner`` (the result) against ``ref``; ParityError beyond the tolerance of ``storage``
    (a dtype or GGUF outtype) or when ``result_ids`` differ from the reference ids."""
    scale = max([1.0] + [float(np.abs(logits).max()) for logits in ref.logits])
    limit = TOLERANCE[storage] * scale
    worst, worst_text, same_greedy = 0.0, "", 0
    for text, ids, logits, greedy, seen in zip(ref.texts, ref.ids, ref.logits, ref.greedy, result_ids):
        if seen != ids:
            raise ParityError(f"{target}: its tokenizer gives other ids than training's for {text!r}: "
                              f"{seen} instead of {ids}; nothing was written (--no_check skips the check)")
        diff = float(np.abs(runner.logits(ids) - logits).max())
        if not diff <= limit:  # NaN fails too
            worst, worst_text = diff, text
            break
        if diff > worst:
            worst, worst_text = diff, text
        same_greedy += runner.greedy(ids) == greedy
    if not worst <= limit:
        raise ParityError(f"{target}: {what} differs from its source: max |logit diff| {worst:.3g} > {limit:.3g} "
                          f"({storage} tolerance) on {worst_text!r}; nothing was written (--no_check skips the check)")
    count = len(ref.ids)
    return (f"parity ({what} vs source, {count} prompts from {ref.origin}): max |logit diff| {worst:.1e} "
            f"(limit {limit:.1e}), token ids {count}/{count} equal, greedy {NEW_TOKENS} tokens "
            f"{same_greedy}/{count} equal")


def check_model_folder(ref: Reference, folder: str, target: str) -> str:
    """Load a written model folder back (weights upcast to fp32) and compare it with the reference."""
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import load_chat_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    storage = str(model.dtype).removeprefix("torch.")
    tokenizer = load_chat_tokenizer(folder)
    result_ids = [rendered_ids(tokenizer, messages)[1] for messages in ref.prompts]  # its own template and ids
    return compare(ref, TransformersRunner(model, stop_token_ids(tokenizer)), result_ids, storage, f"{storage} model",
                   target)


def check_gguf(ref: Reference, path: str, outtype: str, stop: list[int], target: str) -> str:
    """Run the GGUF file through llama-cpp-python and compare; says so when it is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return SKIPPED_GGUF
    context = max(len(ids) for ids in ref.ids) + NEW_TOKENS + 8
    runner = LlamaCppRunner(path, stop, context)
    try:
        return compare(ref, runner, [runner.tokenize(text) for text in ref.texts], outtype,
                       f"{outtype} GGUF via llama.cpp", target)
    finally:
        runner.close()
