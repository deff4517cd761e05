"""Template parity audit: the ids and masks the toolkit trains on, reply by reply, against the chat template itself.

For every assistant turn k of a conversation the template gives the reference: the prompt inference feeds,
``apply_chat_template(messages[:k], add_generation_prompt=True)`` tokenized, and the reply, the tokens that
``apply_chat_template(messages[:k + 1])`` adds after that prompt through the end-of-turn token. The toolkit's
samples for the conversation (``encoding.ChatEncoder.encode_batch``, exactly what training writes) must hold
each reply once, learned exactly over the reference reply and after exactly the reference prompt. The first
difference of a conversation is one line, decoded: ``FILE:LINE: turn K: toolkit '...' / template '...'``.

A message whose text holds a special token's text (``</s>`` inside HTML) is tokenized as text by the toolkit on
purpose (see encoding.py), where the template's own tokenization reads a control token: such replies are
counted, not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .encoding import IGNORE_INDEX, get_encoder
from .rendering import TemplateError, template_options

CONTEXT_TOKENS = 6  # tokens shown on either side of a difference


@dataclass
class AuditReport:
    conversations: int = 0
    replies: int = 0
    protected: int = 0  # replies in conversations with special-token text, not compared
    differences: list = field(default_factory=list)  # one line per conversation that differs

    def summary(self, name: str) -> str:
        if self.differences:
            verdict = (f"{len(self.differences)} conversation(s) differ from the template (first difference of "
                       "each above)")
        else:
            verdict = "every reply is learned after exactly the template's prompt and as exactly its reply"
        protected = (f"; {self.protected} reply(ies) with special-token text in their conversation not compared "
                     "(read as text on purpose)") if self.protected else ""
        return (f"template audit of {name}: {self.conversations} conversation(s), {self.replies} reply(ies): "
                f"{verdict}{protected}")


def _tokens(tokenizer, ids) -> str:
    return repr(tokenizer.decode(ids, skip_special_tokens=False))


def _difference(tokenizer, ours: list[int], theirs: list[int]) -> tuple[str, str]:
    """The two sequences around their first difference, decoded."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    begin = max(0, at - CONTEXT_TOKENS)
    return (_tokens(tokenizer, ours[begin:at + CONTEXT_TOKENS]), _tokens(tokenizer, theirs[begin:at + CONTEXT_TOKENS]))


def reference_turns(tokenizer, example: dict, enable_thinking=None) -> dict:
    """{message index of each reply: (prompt ids, reply ids)} as the template alone gives them; the reply ids are
    None when the template's full rendering does not start with its prompt's ids."""
    messages, tools = example["messages"], example.get("tools")
    options = template_options(example.get("enable_thinking", enable_thinking))
    eot = tokenizer.convert_tokens_to_ids(get_encoder(tokenizer).end_of_turn)  # probed once, when it was built

    def ids(conversation, prompt):
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=prompt,
                                             **options)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    turns = {}
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = ids(messages[:k], True), ids(messages[: k + 1], False)
        reply = full[len(prompt):] if full[: len(prompt)] == prompt else None
        if reply is not None and eot in reply:
            reply = reply[: reply.index(eot) + 1]
        turns[k] = (prompt, reply)
    return turns


def _learned_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def audit_conversation(tokenizer, example: dict, enable_thinking=None) -> tuple[int, int, str | None]:
    """(replies, replies not compared, the first difference as "turn K: toolkit ... / template ..." or None)."""
    from .tokenized import unwritable

    encoder = get_encoder(tokenizer)
    thinking = example.get("enable_thinking", enable_thinking)
    reference = reference_turns(tokenizer, example, enable_thinking)
    problem = unwritable(example, encoder)
    if problem:
        return len(reference), 0, problem
    try:
        samples = encoder.render_samples(example["messages"], example.get("tools"), thinking)
    except TemplateError as e:
        return len(reference), 0, f"turn {getattr(e, 'turn', '?')}: the toolkit cannot place the replies: {e}"
    if any(encoder.needs_protection(sample) for sample in samples):
        return len(reference), len(reference), None
    rows = encoder.encode_batch([example], None, enable_thinking).to_pylist()
    seen = []
    for sample, row in zip(samples, rows):
        ids, runs = row["input_ids"], _learned_runs(row["labels"])
        if len(runs) != len(sample.turns):
            return len(reference), 0, (f"turn {sample.turns[0] + 1}: the toolkit learns {len(runs)} span(s) in a "
                                       f"sample meant to teach {len(sample.turns)} reply(ies)")
        for k, (first, stop) in zip(sample.turns, runs):
            seen.append(k)
            prompt, reply = reference[k]
            if ids[:first] != prompt:
                ours, theirs = _difference(tokenizer, ids[:first], prompt)
                return len(reference), 0, f"turn {k + 1}: context: toolkit {ours} / template {theirs}"
            if reply is None:
                return len(reference), 0, (f"turn {k + 1}: the template's ids for this reply do not start with its "
                                           "prompt's ids (the reply merges with the generation prompt)")
            if ids[first:stop] != reply:
                ours, theirs = _difference(tokenizer, ids[first:stop], reply)
                return len(reference), 0, f"turn {k + 1}: reply: toolkit {ours} / template {theirs}"
    missing = sorted(set(reference) - set(seen))
    if missing:
        return len(reference), 0, f"turn {missing[0] + 1}: no sample learns this reply"
    return len(reference), 0, None


def audit(tokenizer, examples, where, enable_thinking=None, limit: int | None = None) -> AuditReport:
    """Audit ``examples`` (normalised examples; ``where(i)`` names the i-th, e.g. FILE:LINE), the first ``limit``."""
    report = AuditReport()
    for i, example in enumerate(examples):
        if limit is not None and i >= limit:
            break
        replies, protected, difference = audit_conversation(tokenizer, example, enable_thinking)
        report.conversations += 1
        report.replies += replies
        report.protected += protected
        if difference:
            report.differences.append(f"{where(i)}: {difference}")
    return report


def audit_dataset(conversations, tokenizer, source: str | None = None, enable_thinking=None,
                  limit: int | None = None) -> AuditReport:
    """The audit of loaded conversations (``checks.load_conversations``), the first ``limit`` of them."""
    from .sources import _location
    from .tokenized import _load_example

    rows = conversations if limit is None else conversations.select(range(min(limit, len(conversations))))
    positions = rows["position"] if "position" in rows.column_names else [None] * len(rows)

    def where(i):
        return _location(source, positions[i]) if source and positions[i] is not None else source or f"sample {i}"

    return audit(tokenizer, (_load_example(text) for text in rows["example"]), where, enable_thinking)


def check_template_parity(conversations, tokenizer, source: str, enable_thinking=None, limit: int = 32) -> None:
    """Training's gate: the first ``limit`` conversations audited; the first difference stops the run in one line."""
    if limit <= 0:
        return
    report = audit_dataset(conversations, tokenizer, source, enable_thinking, limit)
    if report.differences:
        raise TemplateError(f"{report.differences[0]} (the template parity audit of the first {limit} training "
                            "conversations; python -m minicpm_finetune.data --audit lists every difference)")
