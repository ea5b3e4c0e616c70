"""Intel AutoRound's own GGUF export as a peer, on the off-grid model of benchmarks.method_quality:
`python -m benchmarks.autoround_quality [--levels Q4_K_M Q3_K_M Q2_K] [--iters 50] [--venv /work/ar-venv]`.

AutoRound (`pip install auto-round`, torch + transformers) lives in its own virtual environment
(--venv) and runs there as a subprocess; nothing here imports it. Steps:
1. `ggufkit export-hf` turns the F32 GGUF (f32-jitter.gguf of benchmarks.method_quality, in --src)
   into a float32 Hugging Face checkpoint, which is what AutoRound reads.
2. The calibration text is ggufkit's: the first --nsamples windows of --seqlen tokens of Pride and
   Prejudice, cut from the whole text's tokens as `ggufkit imatrix` cuts them (this model adds no
   BOS). AutoRound's `--dataset` takes a local .json/.jsonl file of texts, re-tokenizes each with the
   Hugging Face tokenizer and truncates it to --seqlen; so each window is written as the decoded text
   of its tokens plus a few more, and the run checks that the tokenizer gives the window back.
3. `auto-round --format gguf:<level> --iters N --nsamples 16 --seqlen 512 --dataset calib.jsonl`
   on the CPU: AutoRound's SignRound tuning per decoder block, then its GGUF writer (llama.cpp's
   convert_hf_to_gguf and its mixture rules for the level, with the tuned rounding).
4. The GGUF is scored against the F32 model's logits on the held-out texts (benchmarks.budget_quality
   .score: `ggufkit kld`), loaded with `ggufkit generate`, and set beside llama.cpp's file of the same
   level where benchmarks.method_quality has already scored it (read from its scores.json)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.budget_quality import TEXTS, row
from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS
from ggufkit import models
from ggufkit.gguffile.reader import read_header
from ggufkit.runtime.load import Session
from ggufkit.runtime.perplexity import read_text, split_windows

GGUFKIT = Path(sys.executable).with_name("ggufkit")
EXTRA_TOKENS = 8  # decoded past each window, so truncation to --seqlen, not a short text, ends it

# runs in AutoRound's venv: the Hugging Face tokens of each calibration text, as AutoRound cuts them
CHECK_TOKENS = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = [json.loads(line)["text"].rstrip() for line in open(sys.argv[2])]
print(json.dumps([tok(t, truncation=True, max_length=int(sys.argv[3]))["input_ids"] for t in texts]))
"""


def calibration(hf: Path, f32: Path, out: Path, nsamples: int, seqlen: int, python: Path) -> tuple[Path, int]:
    """calib.jsonl: one text per window of ggufkit's calibration; returns it and the number of
    windows the Hugging Face tokenizer gives back token for token."""
    from tokenizers import Tokenizer

    with Session(f32, n_ctx=seqlen, n_batch=seqlen) as s:
        tokens = s.tokenize(read_text(CORPUS / "prideprejudice.txt"))
        bos = s.bos
    windows = split_windows(tokens, seqlen, nsamples, CORPUS / "prideprejudice.txt")
    if bos is not None:  # ggufkit puts BOS in place of each window's first token
        windows[:, 0] = bos
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    path = out / f"calib-{nsamples}x{seqlen}.jsonl"
    with path.open("w") as f:
        for i in range(len(windows)):
            ids = windows[i].tolist() + tokens[(i + 1) * seqlen:(i + 1) * seqlen + EXTRA_TOKENS].tolist()
            f.write(json.dumps({"text": tok.decode(ids, skip_special_tokens=False)}) + "\n")
    got = json.loads(subprocess.run([str(python), "-c", CHECK_TOKENS, str(hf), str(path), str(seqlen)],
                                    check=True, capture_output=True, text=True, env=quiet_env()).stdout)
    same = sum(g == w.tolist() for g, w in zip(got, windows))
    return path, same


def quiet_env(threads: int | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", AUTO_ROUND_GGUF_AUTO_UPDATE="0")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB) of `cmd`, its output in `log`; its process group is
    killed past `timeout`. The CPU seconds (user + system) are the measure on a shared machine."""
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        result = {}
        waiter = threading.Thread(target=lambda: result.update(zip(("pid", "status", "usage"),
                                                                   os.wait4(proc.pid, 0))))
        waiter.start()
        waiter.join(timeout)
        if waiter.is_alive():
            os.killpg(proc.pid, signal.SIGKILL)
            waiter.join()
            raise TimeoutError(f"{cmd[0]} ran past {timeout:.0f} s (log: {log})")
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(result["status"]) != 0:
        raise RuntimeError(f"{cmd[0]} failed (log: {log}):\n" + log.read_text()[-3000:])
    usage = result["usage"]
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def reference_scores(src: Path, level: str, bases: dict) -> dict | None:
    """llama.cpp's file's scores as benchmarks.method_quality cached them, read only (that run may
    be writing the file); None where it has not scored this level yet."""
    path, cache = src / f"llama.cpp-{level}.gguf", src / "scores.json"
    if not path.exists() or not cache.exists():
        return None
    try:
        scores = json.loads(cache.read_text())
    except json.JSONDecodeError:
        return None
    keys = {t: f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}:{b.name}" for t, b in bases.items()}
    return {t: scores[k] for t, k in keys.items() if k in scores} if all(k in scores for k in keys.values()) else None


def main(argv=None) -> int:
    from benchmarks.budget_quality import score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    p.add_argument("--iters", type=int, default=50, help="AutoRound's tuning iterations per block "
                   "(its CLI's default recipe: 200; auto-round-light: 50)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more auto-round options, last")
    p.add_argument("--chunks", type=int, default=8, help="windows of 512 scored per text (the logits' files)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1500, help="seconds per auto-round run")
    p.add_argument("--venv", default="/work/ar-venv", help="the virtual environment with auto-round")
    p.add_argument("--src", default=str(models.cache_dir() / "bench" / "method" / "smollm2-jitter0.1"),
                   help="benchmarks.method_quality's folder: f32-jitter.gguf and the F32 logits")
    p.add_argument("--out", default=str(models.cache_dir() / "bench" / "autoround"))
    p.add_argument("--reuse", action="store_true", help="score a level's GGUF left by an earlier run "
                   "instead of running auto-round again")
    p.add_argument("--tag", default="", help="suffix of the output folders (e.g. a test run's)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    src, out, venv = Path(args.src), Path(args.out), Path(args.venv)
    out.mkdir(parents=True, exist_ok=True)
    f32 = src / "f32-jitter.gguf"
    bases = {text: src / f"{text}-{args.chunks}.logits" for text in TEXTS}
    missing = [str(b) for b in [f32, *bases.values()] if not b.exists()]
    if missing:
        raise SystemExit(f"run benchmarks.method_quality first (missing: {', '.join(missing)})")
    times = {}

    hf = out / "hf"
    if not (hf / "model.safetensors").exists():
        t0 = time.perf_counter()
        subprocess.run([str(GGUFKIT), "export-hf", str(f32), str(hf), "--dtype", "float32"], check=True)
        times["export-hf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib, same = calibration(hf, f32, out, args.nsamples, args.seqlen, venv / "bin" / "python")
    times["calibration text"] = time.perf_counter() - t0
    print(f"{calib}: {args.nsamples} windows of {args.seqlen}; the Hugging Face tokenizer gives back "
          f"{same} of them token for token", flush=True)

    n_params = sum(t.n_elements for t in read_header(f32).tensors)
    rows, runs = [], {}
    for level in args.levels:
        ref = reference_scores(src, level, bases)
        if ref:
            rows.append(row(f"llama.cpp {level}", src / f"llama.cpp-{level}.gguf", n_params, ref))
        tag = f"-{args.tag}" if args.tag else ""
        folder = out / f"{level.lower()}-i{args.iters}-n{args.nsamples}x{args.seqlen}{tag}"
        cmd = [str(venv / "bin" / "auto-round"), str(hf), "--format", f"gguf:{level.lower()}",
               "--iters", str(args.iters), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--dataset", str(calib), "--device_map", "cpu", "--output_dir", str(folder), *args.extra]
        folder.mkdir(parents=True, exist_ok=True)
        print("$ " + " ".join(cmd), flush=True)
        ggufs = sorted(folder.rglob("*.gguf"), key=lambda g: g.stat().st_mtime)
        if args.reuse and ggufs:  # a finished earlier run: its times are in its log
            wall = cpu = peak = float("nan")
            print(f"reusing {ggufs[-1]}", flush=True)
        else:
            try:
                wall, cpu, peak = run_logged(cmd, folder / "auto-round.log", args.timeout, quiet_env(args.threads))
            except (TimeoutError, RuntimeError) as e:
                print(f"auto-round {level}: {e}", flush=True)
                runs[level] = {"cmd": cmd, "error": str(e)}
                continue
            times[f"auto-round {level}"] = wall
            times[f"auto-round {level} (CPU)"] = cpu
        ggufs = sorted(folder.rglob("*.gguf"), key=lambda g: g.stat().st_mtime)
        if not ggufs:
            print(f"auto-round {level}: no .gguf under {folder}", flush=True)
            runs[level] = {"cmd": cmd, "error": "no gguf"}
            continue
        gguf = ggufs[-1]
        t0 = time.perf_counter()
        gen = subprocess.run([str(GGUFKIT), "generate", str(gguf), "-p", "The", "-n", "8"],
                             capture_output=True, text=True)
        times[f"generate {level}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = score(gguf, bases, args.threads)
        times[f"score {level}"] = time.perf_counter() - t0
        rows.append(row(f"autoround {level} i{args.iters}", gguf, n_params, scores))
        runs[level] = {"cmd": cmd, "gguf": str(gguf), "bytes": gguf.stat().st_size, "seconds": wall,
                       "cpu_seconds": cpu, "peak_rss_mb": peak, "scores": scores, "generate_rc": gen.returncode,
                       "generate": (gen.stdout + gen.stderr).strip()[-500:]}
        print(f"{gguf}: {gguf.stat().st_size} bytes, auto-round {wall:.0f} s ({cpu:.0f} s CPU), peak {peak:.0f} MB; "
              f"generate rc {gen.returncode}: {gen.stdout.strip()[-200:]!r}", flush=True)
        print(table(rows, list(rows[0])), flush=True)
    if rows:
        print(f"\n{src.name}: {args.chunks} windows of 512 per text; calibration {args.nsamples}x{args.seqlen} "
              f"of Pride and Prejudice\n{table(rows, list(rows[0]))}", flush=True)
    print("\n".join(f"  {k}: {v:.1f} s" for k, v in times.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": runs, "seconds": times,
                                               "calibration_windows_matching": same}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
