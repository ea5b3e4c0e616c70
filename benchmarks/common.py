"""Helpers for side-by-side measurements: run a command, return wall time and peak RSS; race
`ggufkit convert` against llama.cpp's converter."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ggufkit.convert.checkpoint import open_checkpoint
from reference.llama_cpp import llama_cpp_source


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), MB; 0 where unreadable."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total / 2**20


def run_measured(cmd: list[str], **kwargs) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process; raises if it fails. The peak is the larger
    of the child's own (wait4) and its process tree's summed RSS sampled every 20 ms (a pipeline's
    steps, such as convert_hf_to_gguf.py's, may run in children of the measured process)."""
    # stderr goes to a file: llama.cpp's tools log more than a pipe holds, and the pipe is read
    # only after the child exits (wait4 is what gives this child's own peak RSS)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        tree_peak, done = [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                tree_peak[0] = max(tree_peak[0], _tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed: {err.read().decode(errors='replace')[-2000:]}")
    return wall, max(usage.ru_maxrss / 1024, tree_peak[0])


def race_converters(hf: Path, types: list[str], out_dir: Path) -> list[dict]:
    """`ggufkit convert` and llama.cpp's convert_hf_to_gguf.py on checkpoint `hf`, each in a child, for
    each output type: a row of both wall times and peak RSS, their ratios (ours / llama.cpp's), and the
    RSS budget (2x the checkpoint's largest tensor + 300 MB). The outputs are left in out_dir as
    ours-TYPE.gguf and ref-TYPE.gguf. Keep this process small: a child's peak RSS counts its parent's."""
    largest = max(t.end - t.start for t in open_checkpoint(hf).tensors.values()) / 2**20
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    rows = []
    for qtype in types:
        ours = run_measured([sys.executable, "-m", "ggufkit", "convert", str(hf), "-o",
                             str(out_dir / f"ours-{qtype}.gguf"), "--type", qtype, "--force"])
        ref = run_measured([sys.executable, str(script), str(hf), "--outfile", str(out_dir / f"ref-{qtype}.gguf"),
                            "--outtype", qtype.lower()])
        rows.append({"type": qtype, "ours_s": round(ours[0], 2), "ref_s": round(ref[0], 2),
                     "time_ratio": round(ours[0] / ref[0], 3), "ours_rss_mb": round(ours[1]),
                     "ref_rss_mb": round(ref[1]), "rss_ratio": round(ours[1] / ref[1], 3),
                     "rss_budget_mb": round(2 * largest + 300)})
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns)] + [line([r[c] for c in columns]) for r in rows])
