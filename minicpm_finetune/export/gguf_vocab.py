"""The vocabulary of a GGUF file, from the tokenizer trained with: llama.cpp must split every text into the ids
training's tokenizer gives, with nothing to tell it but what is written here.

Three kinds, picked by what the tokenizer's folder holds and what its ``tokenizer.json`` runs (read from the
loaded tokenizer's backend, which is what training ran, not from the file on disk):

- ``tokenizer.model`` (SentencePiece; MiniCPM-1/2/4): llama.cpp's ``llama`` tokenizer, the proto's pieces,
  scores and types, ``add_space_prefix`` from its ``add_dummy_prefix``.
- Byte-level BPE (GPT-2's byte-to-character mapping; MiniCPM5, Llama 3, Qwen2): llama.cpp's ``gpt2``
  tokenizer: the tokens, the merges in rank order and ``tokenizer.ggml.pre``, the name llama.cpp picks its
  split regexes (and ``ignore_merges``) by. The name comes from the pre-tokenizer's exact regexes and flags
  (``PRE_TOKENIZERS``); any other pre-tokenizer is refused, as is a normalizer other than none or NFC
  (llama.cpp applies none: NFC text, nearly all text, is unaffected).
- SentencePiece-style BPE in ``tokenizer.json`` alone (Metaspace "▁", byte fallback; the toolkit's tiny chatml
  and minicpm5 tokenizers) is refused: the only tokenizer llama.cpp has for it (``llama``) merges by token
  score, not by merge rank, and puts its "▁" after every special token and before a leading space, where
  transformers' Metaspace ("first") puts one only at the start of a text and not before a "▁" already there.

Types: special added tokens are control, other added tokens user-defined, the unknown token unknown, rows of
the model no token uses ``[PADn]`` unused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..cli import FinetuneError
from ..data.tokenizer import SENTENCEPIECE_FILE

_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_WORDS_AND_MARKS = r"[^\r\n\p{L}\p{N}]?\p{L}+|%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp's name -> (the Split regexes before ByteLevel, in order, all "Isolated"; ByteLevel's use_regex;
# the model's ignore_merges), as llama.cpp sets them for that name (src/llama-vocab.cpp).
PRE_TOKENIZERS = {
    "gpt-2": ((), True, False),
    "llama-bpe": ((_CONTRACTIONS + "|" + _WORDS_AND_MARKS % r"\p{N}{1,3}",), False, True),
    "qwen2": ((_CONTRACTIONS + "|" + _WORDS_AND_MARKS % r"\p{N}",), False, False),
    "minicpm5": ((r"\p{N}{1,3}", _CONTRACTIONS + "|" + _WORDS_AND_MARKS % r"\p{N}+"), False, True),
}


class VocabularyError(FinetuneError):
    """A tokenizer llama.cpp cannot be told to run as training's."""


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None


def vocabulary(tokenizer_dir: str, tokenizer, vocab_size: int | None = None) -> Vocabulary:
    """The GGUF vocabulary of ``tokenizer`` (its files in tokenizer_dir), padded to ``vocab_size`` (None: only
    checked, not padded); VocabularyError for one that cannot be written faithfully."""
    if os.path.isfile(os.path.join(tokenizer_dir, SENTENCEPIECE_FILE)):
        vocab = _sentencepiece(tokenizer_dir, tokenizer)
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise VocabularyError(f"{tokenizer_dir}: neither {SENTENCEPIECE_FILE} nor a tokenizer.json (fast "
                                  "tokenizer): GGUF export writes SentencePiece and BPE vocabularies")
        vocab = _tokenizer_json(tokenizer_dir, tokenizer, json.loads(backend.to_str()))
    _pad(vocab, tokenizer_dir, vocab_size)
    return vocab


def _token_type(gguf, token) -> int:
    return gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED


def _pad(vocab: Vocabulary, tokenizer_dir: str, vocab_size: int | None) -> None:
    import gguf

    if vocab_size is None:
        return
    if len(vocab.tokens) > vocab_size:
        raise VocabularyError(f"{tokenizer_dir}: the tokenizer has {len(vocab.tokens)} tokens, more than the "
                              f"model's vocab_size {vocab_size}")
    for i in range(len(vocab.tokens), vocab_size):  # the model's rows no token uses
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.types.append(gguf.TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def _sentencepiece(tokenizer_dir: str, tokenizer) -> Vocabulary:
    """Pieces, scores and types as the proto has them, then the tokens added beyond it."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(tokenizer_dir, SENTENCEPIECE_FILE), "rb") as f:
        proto.ParseFromString(f.read())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    token_type = {kinds.NORMAL: gguf.TokenType.NORMAL, kinds.UNKNOWN: gguf.TokenType.UNKNOWN,
                  kinds.CONTROL: gguf.TokenType.CONTROL, kinds.USER_DEFINED: gguf.TokenType.USER_DEFINED,
                  kinds.BYTE: gguf.TokenType.BYTE, kinds.UNUSED: gguf.TokenType.UNUSED}
    vocab = Vocabulary("llama", "default", [p.piece.encode("utf-8") for p in proto.pieces],
                       [token_type[p.type] for p in proto.pieces], [p.score for p in proto.pieces],
                       add_space_prefix=proto.normalizer_spec.add_dummy_prefix)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i >= len(vocab.tokens)}
    for i in range(len(vocab.tokens), max(added, default=-1) + 1):
        token = added.get(i)
        vocab.tokens.append(token.content.encode("utf-8") if token else f"[PAD{i}]".encode())
        vocab.scores.append(0.0 if token else -1000.0)
        vocab.types.append(_token_type(gguf, token) if token else gguf.TokenType.UNUSED)
    return vocab


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" (before 0.20) or as ["a", "b"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _steps(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def _tokens_in_id_order(tokenizer, model: dict):
    """(tokens, types) in id order: the BPE model's vocabulary and the added tokens, gaps unused."""
    import gguf

    added = dict(tokenizer.added_tokens_decoder)
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id.update({i: token.content for i, token in added.items()})
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        text = by_id.get(i)
        tokens.append(text.encode("utf-8") if text is not None else f"[PAD{i}]".encode())
        if text is None:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.UNKNOWN if i == tokenizer.unk_token_id else _token_type(gguf, added[i]))
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tokenizer_json(tokenizer_dir: str, tokenizer, spec: dict) -> Vocabulary:
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix"):
        raise VocabularyError(f"{tokenizer_dir}: a '{model.get('type')}' tokenizer.json model (with its options): "
                              "GGUF export writes SentencePiece and BPE vocabularies")
    steps = _steps(spec.get("pre_tokenizer"))
    if steps and steps[-1].get("type") == "ByteLevel":
        return _byte_level(tokenizer_dir, tokenizer, spec, steps)
    if model.get("byte_fallback"):
        raise VocabularyError(f"{tokenizer_dir}: a SentencePiece-style BPE tokenizer.json (byte fallback, "
                              f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))}) without tokenizer.model: "
                              "llama.cpp's SentencePiece tokenizer would not give its ids (docs/deploy.md)")
    raise VocabularyError(f"{tokenizer_dir}: the BPE tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))}"
                          " is neither byte-level nor SentencePiece-style: llama.cpp has no faithful match for it")


def _byte_level(tokenizer_dir: str, tokenizer, spec: dict, steps: list[dict]) -> Vocabulary:
    *splits, byte_level = steps
    if byte_level.get("add_prefix_space") or any(
            s.get("type") != "Split" or s.get("behavior") != "Isolated" or s.get("invert") or
            "Regex" not in s.get("pattern", {}) for s in splits):
        name = None
    else:
        signature = (tuple(s["pattern"]["Regex"] for s in splits), bool(byte_level.get("use_regex", True)),
                     bool(spec["model"].get("ignore_merges")))
        name = next((pre for pre, known in PRE_TOKENIZERS.items() if known == signature), None)
    if name is None:
        raise VocabularyError(f"{tokenizer_dir}: the byte-level BPE pre-tokenizer {json.dumps(spec['pre_tokenizer'])} "
                              f"(ignore_merges {bool(spec['model'].get('ignore_merges'))}) matches none llama.cpp "
                              f"knows by name here ({', '.join(PRE_TOKENIZERS)})")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise VocabularyError(f"{tokenizer_dir}: the tokenizer's normalizer {json.dumps(normalizer)}: llama.cpp "
                              "applies none to byte-level BPE")
    tokens, types = _tokens_in_id_order(tokenizer, spec["model"])
    merges = [f"{a} {b}" for a, b in _merge_pairs(spec["model"])]
    return Vocabulary("gpt2", name, tokens, types, merges=merges)
