"""Weights that already sit on a block grid (fake-quant QAT exports, or a GGUF exported back to a
checkpoint): find, per 32-element block, the fp16 scale (and min) and integer codes that reproduce the
values, and write exactly those bytes instead of re-running a scale search.

A block fits when every value equals what ggml's dequantizer computes from the candidate codes,
up to float rounding of the source dtype. Candidates come from the block's extreme value: for a
symmetric grid x = d*c (c in [lo, hi]), the extreme is d*k for some code k, so d = fp16(x_ext / k)
(and its fp16 neighbours, which absorb the rounding of the original scale); for an affine grid
x = d*c + m, m is the block minimum (code 0) and x_max - m = d*k."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from ggufkit.kquants.legacy import pack_blocks

Q = gguf.GGMLQuantizationType
QK = 32
# Blocks checked before committing to a whole tensor, in stages: a float tensor off the grid fails on
# its first blocks, after every candidate scale has been tried on just those.
SAMPLE_BLOCKS = (8, 512)


@dataclass(frozen=True)
class Grid:
    lo: int  # smallest code, as the dequantizer sees it (after subtracting the zero point)
    hi: int
    affine: bool  # x = d*c + m (codes from 0) rather than x = d*c
    ks: tuple[int, ...]  # codes the block's extreme may carry, most likely first (ggml's own choice)
    positive_scale: bool = False  # ggml keeps d > 0 (Q8_0: d = amax/127); else d = max/-nmax may be negative


GRIDS = {
    Q.Q4_0: Grid(-8, 7, False, (-8, 7, -7, *range(-6, 0), *range(1, 7))),
    Q.Q5_0: Grid(-16, 15, False, (-16, 15, -15, *range(-14, 0), *range(1, 15))),
    # ggml's and the usual int8 exports' scale is amax/127; allowing other extreme codes would also
    # match coarser grids (a Q5_0 block is a Q8_0 block with d/8), which re-scales rather than preserves.
    Q.Q8_0: Grid(-127, 127, False, (127,), positive_scale=True),
    Q.Q4_1: Grid(0, 15, True, tuple(range(15, 0, -1))),
    Q.Q5_1: Grid(0, 31, True, tuple(range(31, 0, -1))),
}


# Candidate scales tried per numpy pass, sized so a pass touches about this many elements: every
# candidate at once on a small sample of blocks, one at a time on a whole tensor (where most blocks
# fit the first).
BATCH_ELEMENTS = 1 << 18
# Added to an fp16 bit pattern: the value, the next one up, the next one down (mod 2**16).
_NEIGHBOURS = np.array([0, 1, 0xFFFF], np.uint16)


def _scales(ext: np.ndarray, flat: np.ndarray, ks: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Candidate scales `cols` of each block, (n, len(cols)) float32. Candidate 3*i + j is fp16(ext / ks[i])
    for j = 0, then its fp16 neighbours above and below, which absorb the rounding of the original scale."""
    h = np.where(flat[:, None], np.float32(0), ext[:, None] / ks[cols // 3]).astype(np.float16).view(np.uint16)
    return (h + _NEIGHBOURS[cols % 3]).view(np.float16).astype(np.float32)


def _tolerance(b: np.ndarray, source_dtype: str) -> np.ndarray:
    """Float rounding of the source: a BF16 or F16 checkpoint stores the grid values rounded."""
    rel = {"BF16": 2.0**-8, "F16": 2.0**-11}.get(source_dtype, 2.0**-23)
    return np.float32(rel) * np.abs(b).max(axis=1, keepdims=True)


def _try(b, d, m, grid, tol):
    """Codes for each block's candidates d (n, s) (and its min m), and whether they reproduce every
    value of the block: (ok (n, s), codes (n, s, 32), max error (n, s))."""
    b, d, m = b[:, None, :], d[:, :, None], m[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.rint((b - m) / d) if grid.affine else np.rint(b / d)
    c = np.nan_to_num(c, nan=0.0)
    diff = np.abs(((d * c + m) if grid.affine else d * c) - b)
    ok = (diff <= tol[:, :, None]).all(axis=-1) & (c >= grid.lo).all(axis=-1) & (c <= grid.hi).all(axis=-1)
    return ok & np.isfinite(d[..., 0]), c, diff.max(axis=-1)


def fit_blocks(b: np.ndarray, qtype, source_dtype: str = "F32"):
    """(n, 32) float32 blocks -> (fits (n,), d, m, codes, max error) with the first fitting candidate."""
    grid = GRIDS[qtype]
    n = len(b)
    tol = _tolerance(b, source_dtype)
    fits = np.zeros(n, bool)
    d_out = np.zeros(n, np.float32)
    c_out, err = np.zeros(b.shape, np.float32), np.zeros(n, np.float32)
    if grid.affine:
        m = b.min(axis=1).astype(np.float16).astype(np.float32)
        ext = b.max(axis=1) - m
    else:
        m = np.zeros(n, np.float32)
        ext = _signed_absmax(b)[1 if grid.positive_scale else 0]
    flat = ext == 0  # all-equal (or all-zero) blocks: d = 0, every code at the zero point
    ks = np.asarray(grid.ks, np.float32)
    j, candidates = 0, 3 * len(ks)
    while j < candidates and not fits.all():
        todo = np.flatnonzero(~fits)
        cols = np.arange(j, min(candidates, j + max(1, BATCH_ELEMENTS // (len(todo) * QK))))
        d = _scales(ext[todo], flat[todo], ks, cols)
        ok, c, e = _try(b[todo], d, m[todo], grid, tol[todo])
        hit = ok.any(axis=1)
        first = ok.argmax(axis=1)[hit]  # candidates are in order of preference
        idx = todo[hit]
        fits[idx], d_out[idx], c_out[idx], err[idx] = True, d[hit, first], c[hit, first], e[hit, first]
        j += len(cols)
    return fits, d_out, np.where(fits, m, np.float32(0)), c_out, err


def _signed_absmax(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block (row of b): the first element of largest magnitude, and that magnitude."""
    mag = np.abs(b)
    idx = np.argmax(mag, axis=1)[:, None]
    return np.take_along_axis(b, idx, 1)[:, 0], np.take_along_axis(mag, idx, 1)[:, 0]


def _pack(rows: np.ndarray, qtype, d, m, c) -> np.ndarray:
    grid = GRIDS[qtype]
    q = c.astype(np.int8).view(np.uint8) if qtype == Q.Q8_0 else (c - (0 if grid.affine else grid.lo)).astype(np.uint8)
    dh, mh = d.astype(np.float16).view("<u2"), m.astype(np.float16).view("<u2")
    return pack_blocks(qtype, dh, mh, q).reshape(rows.shape[0], -1)


@dataclass
class GridFit:
    data: np.ndarray  # the GGUF bytes, (rows, bytes_per_row)
    max_error: float  # largest |dequantized - source|, within the source's float rounding


def fit_grid(x: np.ndarray, qtype, source_dtype: str = "F32") -> GridFit | None:
    """Exact bytes for a float (rows, cols) tensor already on `qtype`'s grid, or None if any block is off it."""
    if x.shape[-1] % QK:
        return None
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)
    if not all(fit_blocks(b[:n], qtype, source_dtype)[0].all() for n in SAMPLE_BLOCKS):
        return None
    fits, d, m, c, err = fit_blocks(b, qtype, source_dtype)
    if not fits.all():
        return None
    return GridFit(_pack(x.reshape(x.shape[0], -1), qtype, d, m, c), float(err.max(initial=0)))


def grid_fraction(x: np.ndarray, qtype, source_dtype: str = "F32") -> float:
    """Share of a tensor's blocks on the grid (for reports on tensors that are not exact)."""
    if x.shape[-1] % QK:
        return 0.0
    return float(fit_blocks(np.asarray(x, np.float32).reshape(-1, QK), qtype, source_dtype)[0].mean())
