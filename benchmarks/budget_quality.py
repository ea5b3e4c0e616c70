"""llama.cpp's mixtures vs ggufkit's budget mixture in no more bytes:
`python -m benchmarks.budget_quality [--models smollm2 gemma3] [--mixtures Q4_K_M Q3_K_M] [--chunks 16]`.

Per model (the F32 GGUF of benchmarks.quantize_speed), an importance matrix from Pride and Prejudice
(--imatrix-chunks windows of 512); then per mixture llama.cpp's file (ggufkit quantize without a
budget: byte-identical to llama-quantize) and ggufkit's `--match-size` file (the budget mixture in
at most the same bytes), each scored against the F32 model on held-out texts (Emma; the Python
source of argparse.py): mean KL divergence, same-top-token %, perplexity, on the same windows.

--proxy-check also tests the budget's loss proxy: from llama.cpp's Q4_K_M file, one tensor kind at a
time is dropped to Q2_K (--tensor-type), and the measured rise in KL divergence is set beside the
rise the proxy predicts (the sum of its per-tensor losses); a proxy that ranks kinds right has a
ratio that does not swing much between kinds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS, f32_gguf
from ggufkit import budget, models
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.gguffile.imatrix import write_imatrix
from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.gguffile.writer import TensorOut, copy_metadata, write_gguf
from ggufkit.mixtures import TensorMeta, allows_quantization, category, fallback
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.kld import compare, save_base_logits

Q = GGMLQuantizationType
TEXTS = {"emma": CORPUS / "emma.txt", "python": Path(argparse.__file__)}
PROXY_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def score(model: Path, bases: dict[str, Path], threads: int) -> dict:
    """Per text the numbers `ggufkit kld` gives; kept beside the model (scores.json), keyed by the
    file's name, size and time, so a rerun scores only files that changed."""
    cache_path = model.parent / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    out = {}
    for name, base in bases.items():
        key = f"{model.name}:{model.stat().st_size}:{model.stat().st_mtime_ns}:{base.name}"
        if key not in cache:
            r = compare(model, base, threads=threads)
            cache[key] = {"kld": r.kld_mean, "kld_se": r.kld_stderr, "top1": 100 * r.top1_agreement,
                          "ppl": r.ppl_model, "ppl_se": r.ppl_model_stderr, "ppl_f32": r.ppl_base}
            cache_path.write_text(json.dumps(cache, indent=1))
        out[name] = cache[key]
    return out


def row(label: str, path: Path, n_params: int, scores: dict) -> dict:
    size = path.stat().st_size
    r = {"file": label, "bytes": size, "bpw": f"{8 * size / n_params:.3f}"}
    for text, s in scores.items():
        r[f"{text} KLD"] = f"{s['kld']:.4f}±{s['kld_se']:.4f}"
        r[f"{text} top1%"] = f"{s['top1']:.2f}"
        r[f"{text} PPL"] = f"{s['ppl']:.3f}"
    return r


def jittered(f32: Path, out: Path, sigma: float) -> Path:
    """`f32` with Gaussian noise of `sigma` x each row's RMS added to every matrix llama.cpp may
    quantize. The test models are dequantized from quantized GGUFs (SmolLM2 Q4_1, Gemma 3 Q4_K_M), so
    their weights sit exactly on those types' grids, which any type search rewards; the noise takes
    them off the grids (a float model, as a checkpoint would be) at about a 4-bit type's error."""
    if out.exists():
        return out
    header = read_header(f32, arrays=True)
    rng = np.random.default_rng(0)

    def data(t):
        x = np.array(tensor_data(header, t)).view(np.float32).reshape(tuple(reversed(t.shape)))
        if allows_quantization(TensorMeta(t.name, t.shape, t.type)):
            rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True))
            x = (x + sigma * rms * rng.standard_normal(x.shape)).astype(np.float32)
        return [x]

    tensors = [TensorOut(t.name, tuple(reversed(t.shape)), t.type, data(t)) for t in header.tensors]
    write_gguf(out, header.architecture, tensors, lambda w: copy_metadata(w, header), desc="jitter")
    return out


def run_model(name: str, mixtures: list[str], args, results: dict) -> None:
    out = Path(args.out) / (name if not args.jitter else f"{name}-jitter{args.jitter:g}")
    f32 = f32_gguf(name)
    name = out.name
    out.mkdir(parents=True, exist_ok=True)
    if args.jitter:
        f32 = jittered(f32, out / "f32-jitter.gguf", args.jitter)
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():
        write_imatrix(collect(f32, [CORPUS / "prideprejudice.txt"], ctx=512, chunks=args.imatrix_chunks,
                              threads=args.threads), imatrix)
    bases = {}
    for text, path in TEXTS.items():
        bases[text] = out / f"{text}-{args.chunks}.logits"
        if not bases[text].exists():
            part = bases[text].with_suffix(".part")
            save_base_logits(f32, path, part, ctx=512, chunks=args.chunks, threads=args.threads)
            part.rename(bases[text])
    n_params = sum(t.n_elements for t in read_header(f32).tensors)
    rows = []
    plans = {}
    for mixture in mixtures:
        ref = out / f"llama-{mixture}.gguf"
        if not ref.exists():
            quantize_gguf(f32, ref, mixture, imatrix=imatrix)
        rows.append(row(f"llama.cpp {mixture}", ref, n_params, score(ref, bases, args.threads)))
        ours = out / f"budget-{mixture}.gguf"
        t0 = time.perf_counter()
        result = quantize_gguf(f32, ours, mixture, imatrix=imatrix, force=True,
                               target=budget.Target(match=mixture))
        seconds = time.perf_counter() - t0
        plans[mixture] = result.plan
        print(f"{name} budget {mixture}: {seconds:.0f} s\n{budget.describe(result.plan)}", flush=True)
        last = score(ours, bases, args.threads)
        rows.append(row(f"ggufkit budget <= {mixture}", ours, n_params, last))
        print(table(rows, list(rows[0])), flush=True)
    results[name] = {"rows": rows, "ppl_f32": {t: s["ppl_f32"] for t, s in last.items()}}
    f32_ppl = ", ".join(f"{t} {s['ppl_f32']:.3f}" for t, s in last.items())
    print(f"\n{name}: {args.chunks} windows of 512 per text; F32 PPL {f32_ppl}\n{table(rows, list(rows[0]))}\n",
          flush=True)
    if args.proxy_check and "Q4_K_M" in plans:
        results[name]["proxy"] = proxy_check(name, f32, imatrix, out, {"emma": bases["emma"]}, plans["Q4_K_M"], args)


def proxy_check(name: str, f32: Path, imatrix: Path, out: Path, bases: dict, plan: budget.Plan, args) -> list:
    """Measured vs predicted rise in KL divergence when one kind drops from Q4_K_M's types to Q2_K."""
    ref = out / "llama-Q4_K_M.gguf"
    header = read_header(ref)
    ref_type = {t.name: t.type for t in header.tensors}
    row_length = {t.name: t.shape[0] for t in header.tensors}
    base_kld = score(ref, bases, args.threads)["emma"]["kld"]
    rows = []
    for kind in args.proxy_kinds:
        names = [n for n in plan.budgeted if category(n) == kind]
        if not names:
            continue
        predicted = 0.0
        for n in names:
            by_type = {o.qtype: o.loss for o in plan.options[n]}
            low = fallback(Q.Q2_K, row_length[n])  # what --tensor-type =q2_k gives it
            predicted += by_type[low] - by_type[ref_type[n]]
        path = out / f"proxy-{kind}.gguf"
        pattern = "token_embd" if kind == "token_embd" else kind + r"\.weight"
        quantize_gguf(f32, path, "Q4_K_M", imatrix=imatrix, tensor_types=[f"{pattern}=q2_k"], force=True)
        measured = score(path, bases, args.threads)["emma"]["kld"] - base_kld
        rows.append({"kind": kind, "to": "Q2_K*", "tensors": len(names), "predicted dloss": f"{predicted:.4f}",
                     "measured dKLD": f"{measured:.4f}", "ratio": f"{measured / predicted:.3f}" if predicted else "-"})
        print(table(rows, list(rows[0])), flush=True)
    print(f"\n{name} proxy check (from llama.cpp Q4_K_M, KLD {base_kld:.4f} on emma):\n{table(rows, list(rows[0]))}\n")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=sorted(models.MODELS))
    p.add_argument("--mixtures", nargs="+", default=["Q4_K_M", "Q3_K_M"])
    p.add_argument("--chunks", type=int, default=8, help="windows of 512 scored per text")
    p.add_argument("--imatrix-chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jitter", type=float, default=0.0, help="first take the weights off the grids of the "
                   "quantized GGUFs the test models come from: noise of this x row RMS (e.g. 0.1)")
    p.add_argument("--proxy-check", action="store_true")
    p.add_argument("--proxy-kinds", nargs="+", default=[*PROXY_KINDS, "token_embd"])
    p.add_argument("--out", default=str(models.cache_dir() / "bench" / "budget"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = {}
    for name in args.models:
        run_model(name, [m.upper() for m in args.mixtures], args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
