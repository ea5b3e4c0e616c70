"""`ggufkit calib-check`: is my calibration text a good one? For one mixture, three files from the
same model: quantized with the importance matrix of the user's text (CAL), without any, and with
the one from the shipped default text (ggufkit/data/calibration.txt). Each is scored on every
evaluation text by its mean KL divergence from the unquantized model (± its standard error, as
llama-perplexity reports it), and a verdict per text says whether CAL's file is worse than an
alternative by more than the noise.

The three files are scored on the same tokens, so the noise of a difference is the standard error
of the per-token differences (paired); CAL's file counts as worse where its mean KL divergence
exceeds an alternative's by more than NOISE_SIGMAS of them."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggufkit.commands.convert import DEFAULT_CALIBRATION
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.commands.report import (DEFAULT_CHUNKS, check_source, check_texts, chunk_count, make_imatrix,
                                     model_stem, parse_types, prepare_base, store_base_logits, text_names)
from ggufkit.errors import GgufkitError
from ggufkit.mixtures import MIXTURES, requires_imatrix
from ggufkit.progress import bar
from ggufkit.runtime.kld import KldStats, compare
from ggufkit.runtime.perplexity import DEFAULT_BATCH, mean_and_stderr

NOISE_SIGMAS = 2.0  # a difference beyond 2 paired standard errors is not noise (~95%, one-sided 97.5%)
VARIANTS = ("calibration", "none", "default")  # CAL's imatrix, no imatrix, the shipped text's imatrix


@dataclass
class Score:
    kld: float
    kld_stderr: float
    top1: float  # %
    ppl: float
    tokens: int


@dataclass
class Difference:
    """CAL's file minus an alternative, mean KL divergence per token, with the paired standard error."""
    kld: float
    stderr: float

    @property
    def sigmas(self) -> float:
        return self.kld / self.stderr if self.stderr > 0 else (np.inf if self.kld > 0 else 0.0)

    def worse(self) -> bool:
        return self.kld > 0 and self.kld > NOISE_SIGMAS * self.stderr


def _paired(a: np.ndarray, b: np.ndarray) -> Difference:
    d = a.astype(np.float64) - b.astype(np.float64)
    mean, err = mean_and_stderr(float(d.sum()), float((d * d).sum()), len(d))
    return Difference(mean, err)


def calib_check(model, calibration, texts, qtype: str = "Q4_K_M", ctx: int = 512,
                chunks: int | None = DEFAULT_CHUNKS, calibration_ctx: int = 512,
                calibration_chunks: int | None = None, allow_requantize: bool = False, n_gpu_layers: int = 0,
                threads: int | None = None, tmp_dir=None) -> dict:
    """Score `qtype` made with `calibration`'s imatrix, without one, and with the default text's, on
    every text; returns a JSON-ready object with a verdict per text. `calibration`: one or more text
    paths (joined, as `imatrix` joins them)."""
    types = parse_types(qtype, "--type")
    if len(types) != 1:
        raise GgufkitError(f"--type: give one quantization type, not {len(types)}")
    qtype = types[0]
    if requires_imatrix("blk.0.ffn_down.weight", MIXTURES[qtype][1], qtype):
        raise GgufkitError(f"--type {qtype} cannot be made without an importance matrix, so there is "
                           "nothing to compare against; choose another type")
    calibration = check_texts([calibration] if isinstance(calibration, (str, Path)) else calibration,
                              "--calibration")
    texts = check_texts(texts)
    names = text_names(texts)
    chunks = chunk_count(chunks)
    check_source(model, allow_requantize)
    run = dict(n_gpu_layers=n_gpu_layers, threads=threads)
    stem = model_stem(model)
    results: dict[str, dict[str, tuple[Score, np.ndarray]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory(prefix=".ggufkit-calib-check-", dir=tmp_dir) as tmp, \
            bar(total=len(texts) * (1 + len(VARIANTS)), desc="calib-check", unit="step") as progress:
        tmp = Path(tmp)
        progress.set_postfix_str("base model")
        base, _ = prepare_base(model, tmp, stem)
        logits = store_base_logits(base, texts, tmp / "logits", ctx, chunks, progress=progress, **run)
        for variant in VARIANTS:
            imatrix = None
            if variant != "none":
                progress.set_postfix_str(f"imatrix ({variant})")
                source = calibration if variant == "calibration" else [DEFAULT_CALIBRATION]
                imatrix = make_imatrix(base, source, tmp / f"imatrix-{variant}.gguf", calibration_ctx,
                                       calibration_chunks, **run)
            progress.set_postfix_str(f"quantize ({variant})")
            path = quantize_gguf(base, tmp / f"{stem}-{qtype}-{variant}.gguf", qtype, imatrix=imatrix,
                                 allow_requantize=allow_requantize).path
            for name, stored in zip(names, logits):
                progress.set_postfix_str(f"{variant} on {name}")
                stats = KldStats()
                r = compare(path, stored, batch=DEFAULT_BATCH, stats=stats, **run)
                score = Score(r.kld_mean, r.kld_stderr, 100 * r.top1_agreement, r.ppl_model, r.tokens)
                results[name][variant] = (score, np.concatenate(stats.kld_values))
                progress.update()
            path.unlink()
    out_texts = {}
    cal_name = ", ".join(p.name for p in calibration)
    for name in names:
        scores = {v: results[name][v][0] for v in VARIANTS}
        cal_values = results[name]["calibration"][1]
        diffs = {alt: _paired(cal_values, results[name][alt][1]) for alt in ("none", "default")}
        out_texts[name] = {
            **{v: asdict(s) for v, s in scores.items()},
            **{f"vs_{alt}": {**asdict(d), "sigmas": d.sigmas} for alt, d in diffs.items()},
            "worse": any(d.worse() for d in diffs.values()),
            "verdict": verdict(name, cal_name, scores, diffs),
        }
    return {"model": str(model), "type": qtype, "calibration": [p.name for p in calibration],
            "default_calibration": DEFAULT_CALIBRATION.name, "ctx": ctx, "noise_sigmas": NOISE_SIGMAS,
            "texts": out_texts}


ALTERNATIVE = {"none": "no imatrix", "default": "the default calibration text's imatrix"}


def verdict(name: str, cal_name: str, scores: dict[str, Score], diffs: dict[str, Difference]) -> str:
    """One line: where CAL's file is worse than an alternative beyond the noise, by how much; else ok."""
    worse = [(alt, d) for alt, d in diffs.items() if d.worse()]
    if worse:
        parts = [f"{ALTERNATIVE[alt]} by {d.kld:.5f} ± {d.stderr:.5f} ({d.sigmas:.1f} σ)" for alt, d in worse]
        return (f"{name}: WORSE: {cal_name}'s imatrix gives mean KLD {scores['calibration'].kld:.5f}, "
                f"above {' and '.join(parts)}")
    better = [alt for alt, d in diffs.items() if d.kld < 0 and -d.kld > NOISE_SIGMAS * d.stderr]
    detail = "; ".join(f"vs {ALTERNATIVE[alt]} {d.kld:+.5f} ± {d.stderr:.5f}" for alt, d in diffs.items())
    if len(better) == len(diffs):
        return f"{name}: ok: {cal_name}'s imatrix beats both alternatives beyond the noise ({detail})"
    return f"{name}: ok: {cal_name}'s imatrix is not worse than the alternatives beyond the noise ({detail})"


def render_text(result: dict) -> str:
    """The table (mean KLD ± standard error per text and file) and one verdict line per text."""
    cal = ", ".join(result["calibration"])
    head = ["text", f"{cal} imatrix", "no imatrix", f"{result['default_calibration']} imatrix"]
    cells = [[name, *(f"{t[v]['kld']:.5f} ± {t[v]['kld_stderr']:.5f}" for v in VARIANTS)]
             for name, t in result["texts"].items()]
    widths = [max(len(c) for c in col) for col in zip(head, *cells)]
    lines = [f"{result['type']} of {Path(result['model']).name}: mean KL divergence from the unquantized model",
             *("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *cells]), ""]
    lines += [t["verdict"] for t in result["texts"].values()]
    return "\n".join(lines)
