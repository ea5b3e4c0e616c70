"""Tokenizers -> GGUF keys: BPE vocabularies from tokenizer.json (pre-tokenizer identified from its own
definition, cross-checked against llama.cpp's hashes of known tokenizers), SentencePiece from
tokenizer.model (or, Gemma 4's, stored as BPE in tokenizer.json); special tokens, add_bos/add_eos,
the chat template and the normalizer flags as llama.cpp's converter reads them (`special_vocab`).
Which files a family reads, and the settings it adds (the space prefix), the family decides
(`Family.load_vocab`)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import gguf

from ggufkit.convert.special_vocab import SpecialVocab
from ggufkit.errors import GgufkitError

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# OpenAI's o200k (GPT-4o, GPT-OSS's o200k_harmony): words split at case changes, contractions kept on
_O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}


# llama.cpp pre-tokenizer name -> the Hugging Face pre_tokenizer that splits text the same way.
# One table serves both directions: identifying a checkpoint's tokenizer, and export-hf.
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": _split_then_bytes(_LLAMA3_REGEX),
    "smaug-bpe": _split_then_bytes(_LLAMA3_REGEX),
    "qwen2": _split_then_bytes(_QWEN2_REGEX),
    "gpt-4o": _split_then_bytes(_O200K_REGEX),
}
# Pre-tokenizers whose BPE model takes a whole word found in the vocabulary before merging
# (tokenizer.json's model.ignore_merges; llama.cpp ties the flag to the name). It is what tells
# Llama 3 (llama-bpe) from Smaug's copy of its split (smaug-bpe).
IGNORE_MERGES = {"llama-bpe"}


def _pre_signature(pre: dict | None):
    """What decides the split: step types, regexes and digit handling (not offsets bookkeeping)."""
    if pre is None:
        return None
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 1:
            return _pre_signature(steps[0])
        return ("Sequence", tuple(_pre_signature(p) for p in steps))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return (kind, bool(pre.get("add_prefix_space")), pre.get("use_regex", True))
    if kind == "Split":
        return (kind, json.dumps(pre.get("pattern"), sort_keys=True), pre.get("behavior"), pre.get("invert", False))
    if kind == "Digits":
        return (kind, pre.get("individual_digits", False))
    return (kind, json.dumps(pre, sort_keys=True))


def _signature(tokenizer_json: dict):
    return (_pre_signature(tokenizer_json.get("pre_tokenizer")),
            bool(tokenizer_json.get("model", {}).get("ignore_merges", False)))


def definition(name: str) -> dict:
    """The tokenizer.json parts a llama.cpp pre-tokenizer name stands for."""
    return {"pre_tokenizer": PRE_TOKENIZERS[name], "model": {"ignore_merges": name in IGNORE_MERGES}}


@cache
def _known_hashes() -> tuple[str, dict[str, str]]:
    """llama.cpp's check text and its table {sha256 of str(token ids): pre-tokenizer name}."""
    data = json.loads((Path(__file__).resolve().parents[1] / "data" / "bpe_pre_hashes.json").read_text("utf-8"))
    return data["check_text"], data["hashes"]


def llama_cpp_hash(path: Path) -> str | None:
    """The hash llama.cpp's converter computes for this tokenizer.json (its ids for the check text,
    special tokens included); None when the `tokenizers` library cannot load the file."""
    from tokenizers import Tokenizer

    text, _ = _known_hashes()
    try:
        ids = Tokenizer.from_file(str(path)).encode(text).ids
    except Exception as exc:  # noqa: BLE001 - any parse failure only disables the cross-check
        print(f"warning: {path}: the tokenizers library cannot load it ({exc}); pre-tokenizer not cross-checked",
              file=sys.stderr)
        return None
    return hashlib.sha256(str(ids).encode()).hexdigest()


def identify_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """The name llama.cpp knows the tokenizer's pre-tokenizer by. llama.cpp's table of hashes names the
    tokenizers it has checked (its converter writes that name, and llama.cpp's runtime ties settings
    to it); any other tokenizer is identified by its definition. Where both apply and disagree (the
    check text cannot tell some splits apart on some vocabularies), the table wins and we say so."""
    sig = _signature(tokenizer_json)
    by_definition = next((name for name in PRE_TOKENIZERS if _signature(definition(name)) == sig), None)
    by_hash = _known_hashes()[1].get(llama_cpp_hash(path))
    if by_definition and by_hash and by_hash != by_definition:
        print(f"warning: {path}: the pre-tokenizer's definition is {by_definition}'s, llama.cpp's table knows "
              f"these tokens as {by_hash}'s: writing {by_hash}", file=sys.stderr)
    name = by_hash or by_definition
    if name is None:
        raise GgufkitError("unknown BPE pre-tokenizer (not one of: " + ", ".join(PRE_TOKENIZERS) + ", nor a "
                           "tokenizer in llama.cpp's table of hashes): "
                           + json.dumps(tokenizer_json.get("pre_tokenizer"))[:200], path)
    return name


def _looks_special(text: str) -> bool:
    # Some tokenizers leave control tokens unmarked; these spellings are control tokens everywhere.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # DeepSeek's, with full-width bars
            or (text.startswith("<unused") and text.endswith(">")))


@dataclass
class Vocab:
    model: str  # "gpt2" (BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special: SpecialVocab | None = field(default=None, repr=False)

    def add_to_gguf(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


def load_bpe(root: Path, vocab_size: int) -> Vocab:
    path = root / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise GgufkitError(f"invalid tokenizer.json: {exc}", path) from None
    if model.get("type") != "BPE":
        raise GgufkitError(f"unknown tokenizer model type {model.get('type')!r} (expected BPE)", path)
    pre = identify_pre_tokenizer(tj, path)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GgufkitError(f"token id {max(by_id)} is past the config's vocab_size {vocab_size}", path)
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or _looks_special(text)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    special = SpecialVocab(root, load_merges=True)
    return Vocab("gpt2", pre, tokens, types, special=special)


# the special tokens a transformers tokenizer names in its config (its all_special_tokens)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _named_special_tokens(root: Path) -> set[str]:
    """special_tokens_map.json's and tokenizer_config.json's named special tokens and extra ones."""
    texts = set()
    for config in (_read_json(root / "special_tokens_map.json"), tokenizer_config(root)):
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else extra
        for entry in [config.get(k) for k in NAMED_SPECIAL_TOKENS] + extra:
            if entry is not None:
                texts.add(entry["content"] if isinstance(entry, dict) else entry)
    return texts


def load_sentencepiece_bpe(root: Path, model: str) -> Vocab:
    """A SentencePiece vocabulary stored as BPE in tokenizer.json (byte fallback, the decoder a Sequence),
    read as gguf's LlamaHfVocab reads it (Gemma 4's converter): the tokenizer's own tokens, no padding
    to the config's size; every score -1000; <0xXX> tokens BYTE, the named special tokens CONTROL;
    added tokens past the vocabulary USER_DEFINED unless named. Merges from tokenizer.json."""
    path = root / "tokenizer.json"
    tj = tokenizer_json(root)
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE" or not bpe.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "Sequence":
        raise GgufkitError("expected a SentencePiece-style BPE tokenizer (byte_fallback, a Sequence decoder)", path)
    by_id = {i: t for t, i in bpe["vocab"].items()}
    n_base = len(by_id)
    by_id.update({a["id"]: a["content"] for a in tj.get("added_tokens", [])})
    if sorted(by_id) != list(range(len(by_id))):
        raise GgufkitError("tokenizer.json's token ids are not contiguous", path)
    specials = _named_special_tokens(root)
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [gguf.TokenType.BYTE if i < n_base and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)
             else gguf.TokenType.CONTROL if t in specials
             else gguf.TokenType.NORMAL if i < n_base else gguf.TokenType.USER_DEFINED
             for i, t in enumerate(tokens)]
    return Vocab(model, None, tokens, types, scores=[-1000.0] * len(tokens),
                 special=SpecialVocab(root, load_merges=True))


def load_sentencepiece(root: Path, vocab_size: int, verbatim_added_tokens: bool = False) -> Vocab:
    """tokenizer.model's pieces, then the added tokens (`_apply_added_tokens`). With
    `verbatim_added_tokens` (Phi-3's converter) the tokenizer files' added tokens are typed by their
    `special` flag alone and kept as written, and tokenizer.json's added tokens apply too."""
    path = root / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise GgufkitError("reading tokenizer.model needs the 'sentencepiece' package "
                           "(pip install sentencepiece)", path) from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        sp = SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # protobuf and sentencepiece raise assorted types for a bad file
        raise GgufkitError(f"invalid SentencePiece model: {exc}", path) from None
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():  # the config's padding rows, named and scored as llama.cpp does
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    _apply_added_tokens(root, tokens, scores, types, verbatim_added_tokens)
    special = SpecialVocab(root, n_vocab=vocab_size)
    return Vocab("llama", "default", tokens, types, scores=scores, special=special)


def _apply_added_tokens(root: Path, tokens: list, scores: list, types: list, verbatim: bool = False) -> None:
    """added_tokens.json (older checkpoints), then added_tokens_decoder in tokenizer_config.json,
    override pieces (e.g. Gemma's control tokens); ids past the vocabulary are ignored, as llama.cpp does."""
    added = root / "added_tokens.json"
    if added.is_file():
        try:
            entries = json.loads(added.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GgufkitError(f"invalid JSON: {exc}", added) from None
        if not isinstance(entries, dict):
            raise GgufkitError("invalid added tokens: not a JSON object of token -> id", added)
        for text, i in entries.items():
            if isinstance(i, int) and 0 <= i < len(tokens):
                tokens[i], scores[i], types[i] = text, -1000.0, gguf.TokenType.USER_DEFINED
    entries = list(_read_json(root / "tokenizer_config.json").get("added_tokens_decoder", {}).items())
    if verbatim:
        entries += [(a["id"], a) for a in tokenizer_json(root).get("added_tokens", [])]
    for sid, entry in entries:
        i = int(sid)
        if i >= len(tokens):
            continue
        text = entry["content"]
        tokens[i] = text
        scores[i] = -1000.0
        if entry.get("special") or (not verbatim and _looks_special(text)):
            types[i] = gguf.TokenType.CONTROL
        else:
            tokens[i] = text if verbatim else text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED


def _read_json(path: Path) -> dict:
    """A tokenizer file's JSON object, or {} where the checkpoint has none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GgufkitError(f"invalid JSON: {exc}", path) from None
    return data if isinstance(data, dict) else {}


def tokenizer_config(root: Path) -> dict:
    return _read_json(root / "tokenizer_config.json")


def tokenizer_json(root: Path) -> dict:
    return _read_json(root / "tokenizer.json")


def load_vocab(root: Path, vocab_size: int, kinds=("sentencepiece", "bpe"),
               verbatim_added_tokens: bool = False) -> Vocab:
    """The first of `kinds` ("sentencepiece": tokenizer.model, "bpe": tokenizer.json) the checkpoint has."""
    for kind in kinds:
        if kind == "sentencepiece" and (root / "tokenizer.model").is_file():
            return load_sentencepiece(root, vocab_size, verbatim_added_tokens)
        if kind == "bpe" and (root / "tokenizer.json").is_file():
            return load_bpe(root, vocab_size)
    files = {"sentencepiece": "tokenizer.model", "bpe": "tokenizer.json"}
    raise GgufkitError("no tokenizer: " + " nor ".join(files[k] for k in kinds), root)
