"""`ggufkit export-hf`: GGUF -> Hugging Face checkpoint folder (dequantized weights with llama.cpp's
transforms undone, config, tokenizer files, generation config)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.families import family_for_gguf_arch
from ggufkit.convert.safetensors_out import write_safetensors
from ggufkit.convert.tokenizer import PRE_TOKENIZERS, definition
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.progress import bar

T = gguf.TokenType


def _f32_repr(v):
    """GGUF floats are float32: write their shortest decimal form, not float64 noise (in nested settings too)."""
    if isinstance(v, dict):
        return {k: _f32_repr(x) for k, x in v.items()}
    return float(str(np.float32(v))) if isinstance(v, float) else v


def _tokenizer_json(kv: dict, **parts) -> dict:
    """tokenizer.json with the GGUF's control and user-defined tokens as added tokens, matched on the
    raw text before the model runs, as llama.cpp partitions its input."""
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == T.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (T.CONTROL, T.USER_DEFINED)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **parts}


def _bpe_model(vocab: dict, merges: list, **options) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges, **options}


def _adds(kv: dict, role: str) -> bool:
    """Whether llama.cpp adds BOS/EOS: the GGUF's flag, else its default for the vocabulary
    (SentencePiece and Llama 3's BPE add BOS)."""
    key = f"tokenizer.ggml.add_{role}_token"
    if key in kv:
        return bool(kv[key])
    return role == "bos" and (kv.get("tokenizer.ggml.model") == "llama" or kv.get("tokenizer.ggml.pre") == "llama-bpe")


def _added_specials(kv: dict):
    """The post-processor that adds BOS/EOS as llama.cpp does (add_bos_token / add_eos_token), or
    None: encode() with special tokens then gives llama.cpp's ids, which its table of tokenizer
    hashes relies on (Llama 3's BOS is what tells it from Smaug's copy)."""
    tokens = kv["tokenizer.ggml.tokens"]
    ends = {role: kv.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos") if _adds(kv, role)}
    ends = {role: i for role, i in ends.items() if i is not None}
    if not ends:
        return None

    def template(*seqs):
        items = [{"SpecialToken": {"id": tokens[ends["bos"]], "type_id": 0}}] if "bos" in ends else []
        for k, seq in enumerate(seqs):
            items.append({"Sequence": {"id": seq, "type_id": k}})
            if "eos" in ends:
                items.append({"SpecialToken": {"id": tokens[ends["eos"]], "type_id": k}})
        return items

    return {"type": "TemplateProcessing", "single": template("A"), "pair": template("A", "B"),
            "special_tokens": {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}
                               for i in ends.values()}}


def _byte_level_tokenizer_json(kv: dict) -> dict:
    tokens = kv["tokenizer.ggml.tokens"]
    pre = kv.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise GgufkitError(f"cannot export BPE pre-tokenizer {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
    parts = definition(pre)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    specials = _added_specials(kv)
    return _tokenizer_json(
        kv, normalizer=None, pre_tokenizer=parts["pre_tokenizer"],
        post_processor={"type": "Sequence", "processors": [byte_level, specials]} if specials else byte_level,
        decoder={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        model=_bpe_model({t: i for i, t in enumerate(tokens)}, list(kv.get("tokenizer.ggml.merges", [])),
                         **parts["model"]))


def _score_merges(tokens: list[str], scores) -> list[list[str]]:
    """llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose joined text is the
    highest-scoring token; as BPE merges that is every split of every token into two tokens, ranked
    by the joined token's score (best first)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                found.append((-float(scores[i]), i, ids[left], left, right))
    found.sort(key=lambda m: m[:3])
    return [[left, right] for *_, left, right in found]


def _sentencepiece_tokenizer_json(kv: dict) -> dict:
    """The Hugging Face form of a SentencePiece vocabulary: spaces as U+2581 (one before each text
    fragment when add_space_prefix), BPE merges by score (the GGUF's own where it has them: Gemma 4's),
    unknown characters as <0xXX> byte tokens."""
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    decode = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
              {"type": "ByteFallback"}, {"type": "Fuse"}]
    if kv.get("tokenizer.ggml.add_space_prefix", True):
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, space]}
        decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    else:
        normalizer = space
    unk = kv.get("tokenizer.ggml.unknown_token_id")
    merges = kv.get("tokenizer.ggml.merges") or _score_merges(tokens, kv["tokenizer.ggml.scores"])
    return _tokenizer_json(
        kv, normalizer=normalizer, pre_tokenizer=None, post_processor=_added_specials(kv),
        decoder={"type": "Sequence", "decoders": decode},
        model=_bpe_model({t: i for i, t in enumerate(tokens)}, list(merges),
                         unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                         byte_fallback=any(t == T.BYTE for t in types)))


def _sentencepiece_model(kv: dict) -> bytes:
    """A SentencePiece ModelProto carrying the GGUF's pieces, scores and types."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise GgufkitError("exporting a SentencePiece vocabulary needs the 'sentencepiece' package") from None
    kinds = {T.NORMAL: 1, T.UNKNOWN: 2, T.CONTROL: 3, T.USER_DEFINED: 4, T.BYTE: 6, T.UNUSED: 5}
    unk = kv.get("tokenizer.ggml.unknown_token_id", 0)
    proto = pb.ModelProto()
    for i, (piece, score, typ) in enumerate(zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"],
                                                 kv["tokenizer.ggml.token_type"])):
        # SentencePiece allows one unknown piece; llama.cpp also types some padding tokens UNKNOWN
        kind = kinds.get(typ, 1) if typ != T.UNKNOWN or i == unk else kinds[T.UNUSED]
        proto.pieces.add(piece=piece, score=score, type=kind)
    proto.trainer_spec.model_type = 2  # BPE, as llama.cpp's "llama" tokenizer merges by score
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.byte_fallback = any(t == T.BYTE for t in kv["tokenizer.ggml.token_type"])
    proto.trainer_spec.unk_id = unk
    proto.trainer_spec.bos_id = kv.get("tokenizer.ggml.bos_token_id", -1)
    proto.trainer_spec.eos_id = kv.get("tokenizer.ggml.eos_token_id", -1)
    proto.trainer_spec.pad_id = kv.get("tokenizer.ggml.padding_token_id", -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def _special_ids(kv: dict) -> dict:
    return {role: kv[f"tokenizer.ggml.{key}_token_id"] for role, key in
            (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("mask", "mask"))
            if f"tokenizer.ggml.{key}_token_id" in kv}


def write_tokenizer(folder: Path, kv: dict) -> None:
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    model = kv.get("tokenizer.ggml.model")
    ids = _special_ids(kv)
    cfg = {"model_max_length": 1 << 30,
           "add_bos_token": _adds(kv, "bos"), "add_eos_token": _adds(kv, "eos"),
           "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": types[i] == T.CONTROL}
                                    for i, t in enumerate(tokens) if types[i] in (T.CONTROL, T.USER_DEFINED)},
           **{f"{role}_token": tokens[i] for role, i in ids.items()}}
    if "tokenizer.chat_template" in kv:
        cfg["chat_template"] = kv["tokenizer.chat_template"]
    if model == "gpt2":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_json = _byte_level_tokenizer_json(kv)
    elif model == "llama":
        cfg["tokenizer_class"] = "LlamaTokenizer"
        cfg["add_prefix_space"] = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer_json = _sentencepiece_tokenizer_json(kv)
        (folder / "tokenizer.model").write_bytes(_sentencepiece_model(kv))
    elif model == "gemma4":  # SentencePiece as BPE in tokenizer.json alone, its control tokens named as special
        cfg["tokenizer_class"] = "GemmaTokenizer"
        cfg["additional_special_tokens"] = [t for t, kind in zip(tokens, types) if kind == T.CONTROL]
        tokenizer_json = _sentencepiece_tokenizer_json(kv)
    else:
        raise GgufkitError(f"cannot export tokenizer model {model!r} (supported: gpt2, llama, gemma4)")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def export_hf(src, outdir, dtype: str = "float32", force: bool = False, max_shard_bytes: int = 5 * 10**9) -> Path:
    src, outdir = Path(src), Path(outdir)
    if dtype not in ("float32", "bfloat16"):
        raise GgufkitError(f"unknown --dtype {dtype!r}; choose float32 or bfloat16")
    if outdir.exists() and any(outdir.iterdir()) and not force:
        raise GgufkitError("output folder exists and is not empty (use --force to overwrite)", outdir)
    header = read_header(src, arrays=True)
    kv = header.metadata
    arch = kv.get("general.architecture")
    fam_cls = family_for_gguf_arch(arch, kv)
    tensors = {t.name: t for t in header.tensors}

    def values(name: str) -> np.ndarray | None:
        """A GGUF tensor's values in float32, in numpy's order of its shape; None where the file has none."""
        if (t := tensors.get(name)) is None:
            return None
        return gguf.quants.dequantize(tensor_data(header, t), t.type).astype(np.float32, copy=False) \
            .reshape(tuple(int(n) for n in reversed(t.shape)))

    n_vocab = len(kv["tokenizer.ggml.tokens"])
    config = fam_cls.config_from_tensors(fam_cls.config_from_gguf(kv, n_vocab, tied="output.weight" not in tensors),
                                         values)
    config.update({f"{role}_token_id": i for role, i in _special_ids(kv).items() if role in ("bos", "eos", "pad")})
    config["torch_dtype"] = dtype
    config = {k: _f32_repr(v) for k, v in config.items()}
    fam = fam_cls(config)
    # checkpoint tensor -> (GGUF tensor, expert index in a merged 3-D tensor, else None)
    to_gguf = {hf: (g, k if len(sources) > 1 else None)
               for g, sources in fam.layout(fam.expected_tensors()) for k, hf in enumerate(sources)}
    missing = sorted({g for g, _ in to_gguf.values() if g not in tensors})
    if missing:
        raise GgufkitError(f"tensor {missing[0]} is missing ({len(missing)} missing in all)", src)
    shapes = {}  # checkpoint tensor -> its shape there: the GGUF tensor's (an expert's), as the family stores it
    for hf, (g, k) in to_gguf.items():
        shape = tuple(int(n) for n in reversed(tensors[g].shape))
        shapes[hf] = fam.checkpoint_shape(hf, shape if k is None else shape[1:])
    joined = fam.joined_tensors(shapes)  # the tensors the checkpoint stores: name -> (its parts, its shape)
    entries = [(name, shape) for name, (_, shape) in joined.items()]

    pbar = bar(total=len(entries), desc="export-hf", unit="tensor")
    last: dict[str, np.ndarray] = {}  # the GGUF tensors the tensor being written needs, dequantized once

    def part(hf_name: str) -> np.ndarray:
        name, expert = to_gguf[hf_name]
        if name not in last:
            last[name] = values(name)
        x = last[name] if expert is None else last[name][expert]
        return fam.untransform(hf_name if expert is not None else name, x).reshape(shapes[hf_name])

    def produce(name: str) -> np.ndarray:
        parts, _ = joined[name]
        needed = {to_gguf[p][0] for p in parts}
        for gguf_name in [g for g in last if g not in needed]:
            del last[gguf_name]
        x = fam.join(name, [part(p) for p in parts])
        pbar.update(1)
        return x if dtype == "float32" else gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)

    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint folder's mode
    try:
        with pbar:
            write_safetensors(tmp, entries, produce, dtype, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_tokenizer(tmp, kv)
        if outdir.exists():
            shutil.rmtree(outdir)
        tmp.rename(outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return outdir
