"""`ggufkit report`: what quantization costs. From one model (a checkpoint, converted losslessly
first, or a float GGUF), make a file per llama.cpp mixture (with an importance matrix from a
calibration text when given), and measure each on every evaluation text: size, bits per weight,
KL divergence from the unquantized model and same-top-token rate (`ggufkit kld`'s numbers),
perplexity, generation speed (a short `ggufkit bench`).

The base model's log-probs are computed once per text and stored in llama.cpp's base-logits format
(runtime.kld), so N candidates cost N forward passes per text, not 2N. Everything is made in a
staging folder beside the output folder, which appears under its name only when complete:
the candidate GGUFs (and the converted base, and the imatrix), report.json, report.png (size vs KL
divergence, Pareto front marked) and report.html (the plot and the table in one file).

Also the pieces `calib_check` shares: the base, the imatrix, the stored base log-probs."""

from __future__ import annotations

import base64
import fcntl
import html
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ggufkit.commands.convert import lossless_type
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.convert.pipeline import convert
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.imatrix import write_imatrix
from ggufkit.gguffile.reader import read_header
from ggufkit.kquants import supported_types
from ggufkit.mixtures import FLOAT_TYPES, MIXTURES
from ggufkit.progress import bar
from ggufkit.runtime.bench import bench
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.inspect import inspect
from ggufkit.runtime.kld import KldResult, compare, save_base_logits
from ggufkit.runtime.perplexity import DEFAULT_BATCH, read_text

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS")
# Windows scored per text: the base log-probs take 2 bytes x vocabulary per scored token on disk
# while the report runs (20 windows of 512 for a 49k vocabulary: 0.5 GB), and 20 x 255 tokens already
# tell the mixtures apart by many standard errors.
DEFAULT_CHUNKS = 20
DEFAULT_BENCH_TOKENS = 64
MARKER = ".ggufkit-report"  # in a staging folder: what the leftover sweep may remove
_FLOAT_SUFFIX = re.compile(r"[-._](f32|f16|bf16)$", re.IGNORECASE)


# ---------------------------------------------------------------- shared with calib_check


def parse_types(types, what: str = "--types") -> list[str]:
    """'Q8_0,q4_k_m' or a list -> validated mixture names, in order, without repeats."""
    if isinstance(types, str):
        types = types.split(",")
    names = list(dict.fromkeys(t.strip().upper() for t in types if t.strip()))
    if not names:
        raise GgufkitError(f"{what}: no quantization type given")
    producible = set(supported_types()) | set(FLOAT_TYPES)
    for name in names:
        if name not in MIXTURES:
            raise GgufkitError(f"{what}: unknown quantization type {name!r}; choose from {', '.join(MIXTURES)}")
        if MIXTURES[name][1] not in producible:
            raise GgufkitError(f"{what}: {name} needs {MIXTURES[name][1].name}, which ggufkit.kquants cannot "
                               "produce yet")
    return names


def text_names(texts) -> list[str]:
    """A label per text: its file name, or the path as given where two names collide."""
    names = [Path(t).name for t in texts]
    return [n if names.count(n) == 1 else str(t) for n, t in zip(names, texts)]


def check_texts(texts, what: str = "--text") -> list[Path]:
    if not texts:
        raise GgufkitError(f"give at least one {what} FILE")
    paths = [Path(t) for t in texts]
    for p in paths:
        read_text(p)  # "no such text file" before anything is made
    return paths


def is_gguf_source(src) -> bool:
    return Path(src).is_file()


def model_stem(src) -> str:
    """The name the made files start with: the GGUF's stem without a float suffix, the folder's
    name, or a hub id's name."""
    if is_gguf_source(src):
        return _FLOAT_SUFFIX.sub("", Path(src).stem) or Path(src).stem
    return str(src).rstrip("/").split("/")[-1] or "model"


def check_source(src, allow_requantize: bool) -> None:
    """A GGUF must be a valid float model (or quantized, with allow_requantize); a checkpoint is
    opened by `convert`. Checked before anything is made."""
    if not is_gguf_source(src):
        if Path(src).exists() or str(src).count("/") == 1:
            return
        raise GgufkitError("no such file or folder, and not a hub repo id of the form owner/name", src)
    header = read_header(src)
    quantized = [t for t in header.tensors if t.type not in FLOAT_TYPES]
    if quantized and not allow_requantize:
        raise GgufkitError(f"already quantized ({quantized[0].type.name} for {quantized[0].name!r}); give an "
                           "F32/F16/BF16 GGUF or a checkpoint, or --allow-requantize to measure against it", src)


def prepare_base(src, folder: Path, stem: str | None = None) -> tuple[Path, str]:
    """(the unquantized model as a GGUF, its type): `src` itself for a GGUF; for a checkpoint, its
    lossless conversion (F32/F16/BF16, as its weights are stored) written into `folder`."""
    if is_gguf_source(src):
        header = read_header(src)
        types = {t.type.name for t in header.tensors if len(t.shape) > 1} or {"F32"}
        return Path(src), "+".join(sorted(types))
    out_type = lossless_type(src)
    path = convert(src, folder / f"{stem or model_stem(src)}-{out_type}.gguf", out_type=out_type)
    return path, out_type


def make_imatrix(base: Path, calibration, out: Path, ctx: int, chunks: int | None, n_gpu_layers: int,
                 threads: int | None) -> Path:
    """Measure the importance matrix of `base` on the calibration text(s) and write it to `out`."""
    texts = [Path(t) for t in calibration]
    imat = collect(base, texts, ctx=ctx, chunks=chunks, n_gpu_layers=n_gpu_layers, threads=threads)
    imat.datasets = [t.name for t in texts]  # the text's name, not where it lay on this machine
    return write_imatrix(imat, out)


def store_base_logits(base: Path, texts: list[Path], folder: Path, ctx: int, chunks: int | None,
                      n_gpu_layers: int, threads: int | None, progress=None) -> list[Path]:
    """The base model's log-probs over each text's windows, once: every candidate is compared to them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        if progress is not None:
            progress.set_postfix_str(f"base on {text.name}")
        paths.append(save_base_logits(base, text, folder / f"{i}.logits", ctx=ctx, chunks=chunks,
                                      batch=DEFAULT_BATCH, n_gpu_layers=n_gpu_layers, threads=threads))
        if progress is not None:
            progress.update()
    return paths


def chunk_count(chunks: int | None) -> int | None:
    """--chunks: 0 or None means the whole text."""
    if chunks is not None and chunks < 0:
        raise GgufkitError(f"--chunks {chunks}: must be 0 (the whole text) or more")
    return chunks or None


# ---------------------------------------------------------------- the report


@dataclass
class TextScore:
    kld: float  # mean KL divergence from the base, nats per token
    kld_stderr: float
    top1: float  # same most likely token as the base, % of scored tokens
    ppl: float
    ppl_stderr: float
    tokens: int
    pareto: bool = False  # on this text's size / KL divergence front


@dataclass
class Row:
    file: str  # a path relative to the output folder, or the source GGUF's own path
    type: str
    method: str  # "base", "imatrix" or "plain"
    bytes: int
    bpw: float
    tokens_per_s: float | None  # generation speed (tg) of the short bench
    texts: dict[str, TextScore] = field(default_factory=dict)


def _score(r: KldResult) -> TextScore:
    return TextScore(r.kld_mean, r.kld_stderr, 100 * r.top1_agreement, r.ppl_model, r.ppl_model_stderr, r.tokens)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (size, loss) point is on the front: no other point is as small and as good,
    and better in one of the two."""
    return [not any(b <= size and l <= loss and (b < size or l < loss) for b, l in points)
            for size, loss in points]


def _sweep_leftovers(out: Path) -> None:
    """Remove staging folders of `out` that killed runs left (our marker inside, no live lock)."""
    name = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}")
    if not out.parent.is_dir():
        return
    for folder in sorted(out.parent.iterdir()):
        if not name.fullmatch(folder.name) or folder.is_symlink() or not (folder / MARKER).is_file():
            continue
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            shutil.rmtree(folder)
            print(f"ggufkit: removed {folder}, left by an interrupted run", file=sys.stderr)
        finally:
            os.close(lock)


def _check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise GgufkitError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise GgufkitError("already exists and is not empty (use --force to replace it)", out)
        inside = [p for p in inputs if Path(p).exists() and Path(p).resolve().is_relative_to(out.resolve())]
        if inside:
            raise GgufkitError(f"holds the input {inside[0]}; --force would remove it", out)


def quant_report(src, texts, out, types=DEFAULT_TYPES, calibration=None, ctx: int = 512,
                 chunks: int | None = DEFAULT_CHUNKS, calibration_ctx: int = 512,
                 calibration_chunks: int | None = None, bench_tokens: int = DEFAULT_BENCH_TOKENS,
                 allow_requantize: bool = False, n_gpu_layers: int = 0, threads: int | None = None,
                 force: bool = False) -> dict:
    """Make every type of `types` from `src` in the folder `out` and measure each on every text;
    write report.json, report.png and report.html there. Returns the JSON object. `calibration`:
    text paths for an importance matrix (None: quantize without one)."""
    types = parse_types(types)
    texts = check_texts(texts)
    names = text_names(texts)
    calibration = None if calibration is None else check_texts(calibration, "--calibration")
    chunks = chunk_count(chunks)
    if bench_tokens < 0:
        raise GgufkitError(f"--bench-tokens {bench_tokens}: must be 0 (no bench) or more")
    out = Path(out)
    _check_output(out, force, [Path(src), *texts, *(calibration or [])])
    check_source(src, allow_requantize)
    stem = model_stem(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    lock = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held to the end: the sweep leaves a live run's folder alone
        (stage / MARKER).touch()
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output folder's mode
        result = _run(src, stem, texts, names, stage, types, calibration, ctx, chunks, calibration_ctx,
                      calibration_chunks, bench_tokens, allow_requantize, n_gpu_layers, threads)
        result["folder"] = str(out)
        write_outputs(result, stage)
        shutil.rmtree(stage / ".logits", ignore_errors=True)
        (stage / MARKER).unlink()
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        stage.rename(out)
    finally:
        os.close(lock)
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _run(src, stem: str, texts: list[Path], names: list[str], stage: Path, types: list[str], calibration,
         ctx: int, chunks: int | None, calibration_ctx: int, calibration_chunks: int | None, bench_tokens: int,
         allow_requantize: bool, n_gpu_layers: int, threads: int | None) -> dict:
    run = dict(n_gpu_layers=n_gpu_layers, threads=threads)
    with bar(total=len(texts) * (1 + len(types)), desc="report", unit="step") as progress:
        progress.set_postfix_str("base model")
        base, base_type = prepare_base(src, stage, stem)
        imatrix = None
        if calibration is not None:
            progress.set_postfix_str("imatrix")
            imatrix = make_imatrix(base, calibration, stage / "imatrix.gguf", calibration_ctx,
                                   calibration_chunks, **run)
        logits = store_base_logits(base, texts, stage / ".logits", ctx, chunks, progress=progress, **run)
        base_row = _row(base, stage, base_type, "base")
        rows, windows = [base_row], {}
        for qtype in types:
            progress.set_postfix_str(qtype)
            path = quantize_gguf(base, stage / f"{stem}-{qtype}.gguf", qtype, imatrix=imatrix,
                                 allow_requantize=allow_requantize).path
            row = _row(path, stage, qtype, "plain" if imatrix is None else "imatrix")
            for name, text, stored in zip(names, texts, logits):
                progress.set_postfix_str(f"{qtype} on {text.name}")
                r = compare(path, stored, batch=DEFAULT_BATCH, **run)
                row.texts[name] = _score(r)
                # the base's own perplexity, from its stored log-probs (as llama-perplexity's PPL(base))
                base_row.texts.setdefault(name, TextScore(0.0, 0.0, 100.0, r.ppl_base, r.ppl_base_stderr, r.tokens))
                windows[name] = r.chunks
                progress.update()
            rows.append(row)
        if bench_tokens:
            for row in rows:
                progress.set_postfix_str(f"bench {row.type}")
                path = stage / row.file if row is not base_row else base
                row.tokens_per_s = bench(path, n_prompt=0, n_gen=bench_tokens, reps=1, **run).tg_tps
    for name in names:
        candidates = rows[1:]
        for row, front in zip(candidates, pareto_front([(r.bytes, r.texts[name].kld) for r in candidates])):
            row.texts[name].pareto = front
    return {
        "source": str(src),
        "base": {"file": base_row.file, "type": base_type},
        "texts": names,
        "ctx": ctx,
        "chunks": windows,  # windows scored per text
        "calibration": None if calibration is None else [Path(c).name for c in calibration],
        "rows": [asdict(r) for r in rows],
    }


def _row(path: Path, stage: Path, qtype: str, method: str) -> Row:
    info = inspect(path)
    shown = path.name if path.parent == stage else str(path)
    return Row(shown, qtype, method, info["file_bytes"], info["bits_per_weight"], None)


# ---------------------------------------------------------------- the three files


def write_outputs(result: dict, folder: Path) -> None:
    png = plot_png(result)
    (folder / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (folder / "report.png").write_bytes(png)
    (folder / "report.html").write_text(render_html(result, png), encoding="utf-8")


def _scale(values: list[float]) -> str:
    """'log' where the values are positive and span more than a factor of 10, else 'linear'."""
    return "log" if values and min(values) > 0 and max(values) / min(values) > 10 else "linear"


def plot_png(result: dict) -> bytes:
    """Size vs KL divergence per text: Pareto-front files filled and joined, the others hollow,
    ± one standard error, the unquantized base as a dotted line at its size."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    base, candidates = rows[0], rows[1:]
    mib = [r["bytes"] / 2**20 for r in candidates]
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    all_kld = []
    for k, name in enumerate(result["texts"]):
        color = colors[k % len(colors)]
        scores = [r["texts"][name] for r in candidates]
        kld = [s["kld"] for s in scores]
        all_kld += kld
        ax.errorbar(mib, kld, yerr=[s["kld_stderr"] for s in scores], fmt="none", ecolor=color, alpha=0.5,
                    capsize=2)
        front = sorted((x, y) for x, y, s in zip(mib, kld, scores) if s["pareto"])
        ax.plot([x for x, _ in front], [y for _, y in front], "-o", color=color, label=f"{name} (Pareto front)")
        rest = [(x, y) for x, y, s in zip(mib, kld, scores) if not s["pareto"]]
        if rest:
            ax.plot([x for x, _ in rest], [y for _, y in rest], "o", mfc="none", color=color,
                    label=f"{name} (dominated)")
    first = result["texts"][0]
    for r, x in zip(candidates, mib):
        ax.annotate(f"{r['type']}\n{r['bpw']:.2f} bpw", (x, r["texts"][first]["kld"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    base_mib = base["bytes"] / 2**20
    base_label = f"base {base['type']}: {base_mib:.3g} MiB, KLD 0"
    if base_mib <= 1.5 * max(mib):
        ax.axvline(base_mib, color="gray", linestyle=":", label=base_label)
    else:  # a line far to the right would squeeze the files into the left edge: the legend says where it is
        ax.plot([], [], " ", label=f"{base_label} (off the plot, right)")
    ax.margins(x=0.12, y=0.12)
    yscale = _scale(all_kld)
    if yscale == "linear" and all_kld and min(all_kld) <= 0 < max(all_kld):
        positive = [v for v in all_kld if v > 0]
        if max(positive) / min(positive) > 10:  # near-lossless files can come out a hair below zero
            ax.set_yscale("symlog", linthresh=min(positive))
    else:
        ax.set_yscale(yscale)
    ax.set_xscale(_scale(mib))
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from the base (nats/token)")
    calib = f", imatrix from {', '.join(result['calibration'])}" if result["calibration"] else ", no imatrix"
    windows = sorted(set(result["chunks"].values()))
    ax.set_title(f"{Path(result['source']).name}: size vs KL divergence\n"
                 f"({'/'.join(map(str, windows))} windows of {result['ctx']} tokens per text{calib})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the report table, as text; a * marks a file on a text's Pareto front."""
    head = ["file", "type", "method", "MiB", "bpw", "tg t/s"]
    for name in result["texts"]:
        head += [f"KLD {name}", "top-1 %", "PPL"]
    cells = []
    for r in result["rows"]:
        line = [r["file"], r["type"], r["method"], f"{r['bytes'] / 2**20:.2f}", f"{r['bpw']:.2f}",
                _fmt(r["tokens_per_s"], ".1f")]
        for name in result["texts"]:
            s = r["texts"].get(name)
            if s is None:
                line += ["–", "–", "–"]
                continue
            mark = "*" if s["pareto"] else ""
            line += [f"{s['kld']:.5f} ± {s['kld_stderr']:.5f}{mark}", f"{s['top1']:.2f}",
                     f"{s['ppl']:.3f} ± {s['ppl_stderr']:.3f}"]
        cells.append(line)
    return head, cells


def render_text(result: dict) -> str:
    head, cells = table_rows(result)
    widths = [max(len(c) for c in col) for col in zip(head, *cells)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *cells]]
    folder = Path(result.get("folder", "."))
    lines.append("* on the size / KL divergence Pareto front for that text")
    lines.append(f"wrote {folder / 'report.json'}, {folder / 'report.png'}, {folder / 'report.html'}")
    return "\n".join(lines)


def render_html(result: dict, png: bytes) -> str:
    head, cells = table_rows(result)
    esc = html.escape
    thead = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>" for line in cells)
    calib = ", ".join(result["calibration"]) if result["calibration"] else "none"
    title = f"ggufkit report: {Path(result['source']).name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }}
th:nth-child(-n+3), td:nth-child(-n+3) {{ text-align: left; }}
tr:nth-child(even) {{ background: #f6f6f6; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p>source {esc(result['source'])}; base {esc(result['base']['type'])}; texts {esc(', '.join(result['texts']))};
windows of {result['ctx']} tokens scored: {esc(', '.join(f'{k} {v}' for k, v in result['chunks'].items()))};
imatrix from {esc(calib)}.</p>
<img alt="file size vs KL divergence from the base" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<table>
<thead><tr>{thead}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<p>KLD: mean KL divergence from the base model (nats per token) ± its standard error; * marks a file on that
text's size / KL divergence Pareto front. top-1: tokens where both models' most likely token is the same.
tg t/s: generation tokens per second (short bench).</p>
</body></html>
"""
