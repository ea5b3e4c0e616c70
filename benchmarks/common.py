"""Helpers for side-by-side measurements: run a command, return wall time and peak RSS."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_measured(cmd: list[str], **kwargs) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process; raises if it fails."""
    # stderr goes to a file: llama.cpp's tools log more than a pipe holds, and the pipe is read
    # only after the child exits (wait4 is what gives this child's own peak RSS)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed: {err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns)] + [line([r[c] for c in columns]) for r in rows])
