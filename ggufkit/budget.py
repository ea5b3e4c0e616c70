"""Mixtures that meet a byte budget (`--target-size`, `--target-bpw`, `--match-size`): per tensor, the
stock GGUF type that minimises the predicted loss of the whole model subject to the file's size.

Every tensor a mixture may quantize gets candidates (Q2_K ... Q8_0, IQ4_XS and F16, each through
llama.cpp's row-fit fallback; the 32-block legacy types where the K-quants' 256-block does not fit
the row). For each candidate the tensor is quantized as the output file would be (importance matrix
included) and its loss predicted as the imatrix-weighted squared error relative to the tensor's
imatrix-weighted energy:

    loss(t, type) = loss_weight(t) * sum_ij a_j (w_ij - dequant(quant(w))_ij)^2 / sum_ij a_j w_ij^2

`a_j` is the mean squared input activation of column j (1 without an imatrix), so the numerator is
the expected squared error of the tensor's output per token and the denominator that output's
expected energy: a noise-to-signal ratio, comparable between tensors of any scale and between those
with and without importance data (token_embd). `loss_weight` says what that ratio costs at the
output: 1 for the output matrix, 1 / (2 n_layer) for a layer's (a quarter of that for attn_q/attn_k),
as measured KL divergence bears out. Large tensors are measured on an even sample of their rows. The allocation minimises the sum of these losses under the byte limit: each tensor's
(bytes, loss) points reduced to their lower convex hull, all tensors start at their cheapest point,
then the next hull step saving the most loss per byte that still fits is taken until none fits.

Only types and metadata stock llama.cpp loads are written; tensors the mixture keeps (norms,
routers, ...) and those the user pins (--tensor-type, --output-tensor-type, --token-embedding-type)
keep their type and count as fixed bytes."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggufkit.errors import GgufkitError
from ggufkit.kquants import dequantize, quantize, supported_types
from ggufkit.mixtures import (FLOAT_TYPES, MIXTURES, ModelInfo, Options, TensorMeta, allows_quantization,
                              category, choose_types, fallback, layer_of, llama_order, requires_imatrix)

Q = GGMLQuantizationType
# What the budget chooses from, cheapest first; each goes through llama.cpp's row-fit fallback.
CANDIDATES = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16)
# Where a row does not fill the K-quants' 256-block, the 32-block types stand in for them.
LEGACY = (Q.Q4_0, Q.IQ4_NL, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
# Tensors are measured on at most this many weights (an even sample of their rows).
SAMPLE_ELEMENTS = 1 << 20
# Factor on the predicted loss per tensor kind (mixtures.category); 1 where absent. Errors in q and k
# reach the output through the attention softmax, which damps them.
KIND_WEIGHTS: dict[str, float] = {"attn_q": 0.25, "attn_k": 0.25}


def loss_weight(name: str, n_layer: int, tied: bool, kind_weights: Mapping[str, float] | None = None) -> float:
    """How much a unit of a tensor's noise-to-signal ratio costs at the model's output. The output
    matrix (token_embd where tied) perturbs the logits directly: 1. A layer's matrix perturbs one of
    the 2 x n_layer sub-layer outputs summed into the residual stream: 1 / (2 n_layer), times its
    kind's factor; the input embedding (untied token_embd) counts as one such sub-layer.

    Checked on SmolLM2 (30 layers, tied; tensor kind by kind dropped from llama.cpp's Q4_K_M types
    to Q2_K): measured KL divergence / weighted predicted loss 6.2-8.7 over attn_q, attn_v, ffn_up,
    ffn_down and token_embd, where the plain ratio spread from 0.03 to 8.7 (benchmarks.budget_quality
    --proxy-check)."""
    kind_weights = KIND_WEIGHTS if kind_weights is None else kind_weights
    cat = category(name)
    if cat == "output" or (cat == "token_embd" and tied):
        return kind_weights.get("output", 1.0)
    return kind_weights.get(cat, 1.0) / (2 * max(n_layer, 1))


@dataclass(frozen=True)
class Target:
    """One way to state the budget: file bytes, bits per weight of the tensor data, or the size of
    the file llama.cpp's mixture `match` makes from the same input ("" = the --type mixture)."""
    size: int | None = None
    bpw: float | None = None
    match: str | None = None
    text: str | None = None  # --target-size as the user wrote it (1.2G)

    def __str__(self) -> str:
        if self.size is not None:
            return f"--target-size {self.text or self.size}"
        if self.bpw is not None:
            return f"--target-bpw {self.bpw:g}"
        return f"--match-size {self.match}"


def parse_target(size: str | int | None = None, bpw: float | str | None = None, match: str | None = None,
                 mixture: str = "") -> Target | None:
    """The budget from --target-size (bytes or 1.2G / 800M), --target-bpw or --match-size [MIXTURE]
    (at most one of them); None without any."""
    given = [name for name, v in (("--target-size", size), ("--target-bpw", bpw), ("--match-size", match))
             if v is not None]
    if len(given) > 1:
        raise GgufkitError(f"give one of {', '.join(given)}, not several")
    if size is not None:
        from ggufkit.gguffile.split import parse_size

        return Target(size=size if isinstance(size, int) else parse_size(size, "--target-size"), text=str(size))
    if bpw is not None:
        try:
            value = float(bpw)
        except ValueError:
            raise GgufkitError(f"invalid --target-bpw {bpw!r} (expected a number of bits, e.g. 4.5)") from None
        if not math.isfinite(value) or value <= 0:
            raise GgufkitError(f"invalid --target-bpw {bpw!r}: must be a positive number")
        return Target(bpw=value)
    if match is not None:
        name = (match or mixture).upper()
        if name not in MIXTURES:
            raise GgufkitError(f"unknown --match-size mixture {name!r}; choose from {', '.join(MIXTURES)}")
        return Target(match=name)
    return None


@dataclass(frozen=True)
class Option:
    qtype: GGMLQuantizationType
    cost: int  # bytes counted against the budget
    loss: float  # predicted loss


@dataclass
class Plan:
    """What the budget chose: every tensor's type, the file's bytes, and the numbers behind them."""
    types: dict[str, GGMLQuantizationType]
    target: Target
    limit: int  # the budget in the target's bytes (file bytes, or tensor bytes for --target-bpw)
    used: int  # what the chosen types take of it
    file_bytes: int  # the whole file
    n_params: int
    loss: float  # predicted total loss
    budgeted: list[str] = field(default_factory=list)  # the tensors whose types were chosen
    losses: dict[str, float] = field(default_factory=dict)  # chosen loss per budgeted tensor
    options: dict[str, list[Option]] = field(default_factory=dict)  # every candidate measured, per tensor


def budgeted(metas: Iterable[TensorMeta], opts: Options | None = None) -> list[str]:
    """The tensors whose type the budget chooses: all a mixture may quantize but those the user pins."""
    opts = opts or Options()
    out = []
    for t in metas:
        if not allows_quantization(t):
            continue
        cat = category(t.name)
        pinned = any(regex.search(t.name) for regex, _ in opts.overrides) \
            or (opts.output_type is not None and cat == "output") \
            or (opts.token_embd_type is not None and cat == "token_embd")
        if not pinned:
            out.append(t.name)
    return out


def candidates(t: TensorMeta, mixture_type: GGMLQuantizationType, has_imatrix: bool, mixture: str = "") -> list[GGMLQuantizationType]:
    """The stock types a tensor may get, after llama.cpp's row-fit fallback, cheapest first."""
    row = t.ne[0]
    types = {fallback(q, row) for q in CANDIDATES}
    if row % 256:
        types |= {q for q in LEGACY if row % GGML_QUANT_SIZES[q][0] == 0}
    if mixture_type not in FLOAT_TYPES:
        types.add(fallback(mixture_type, row))
    usable = set(supported_types()) | {Q.F16}
    types = {q for q in types if q in usable and (has_imatrix or not requires_imatrix(t.name, q, mixture))}
    return sorted(types, key=lambda q: (bytes_per_row(q, row), q.name))


def bytes_per_row(qtype: GGMLQuantizationType, row: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return row // block * size


def tensor_bytes(ne: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of ggml shape `ne` stored as `qtype`."""
    return bytes_per_row(qtype, ne[0]) * int(np.prod(ne[1:], dtype=np.int64))


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def relative_errors(chunks: Iterable[tuple[int, np.ndarray]], ne: tuple[int, ...], qtypes: list[GGMLQuantizationType],
                    weights: np.ndarray | None = None) -> dict[GGMLQuantizationType, float]:
    """Per type: sum_ij a_j (w - dequant(quant(w)))^2 / sum_ij a_j w^2 over an even sample of the
    tensor's rows. `chunks`: (expert, float32 rows) as the writer reads them; `weights`: the
    importance matrix (experts x cols, concatenated) or None (a_j = 1)."""
    cols = ne[0]
    n_rows = int(np.prod(ne[1:], dtype=np.int64))
    stride = max(1, -(-n_rows * cols // SAMPLE_ELEMENTS))
    err = dict.fromkeys(qtypes, 0.0)
    signal, seen = 0.0, 0
    for expert, rows in chunks:
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, cols)
        first = (-seen) % stride  # keep one row in `stride` across chunk boundaries
        seen += len(rows)
        x = np.ascontiguousarray(rows[first::stride])
        if not len(x):
            continue
        a = None
        if weights is not None:
            a = weights[expert * cols:(expert + 1) * cols] if weights.size > cols else weights
            a = np.ascontiguousarray(a, dtype=np.float32)
        scale = np.ones(cols, np.float64) if a is None else a.astype(np.float64)
        signal += float((x.astype(np.float64) ** 2 @ scale).sum())
        for q in qtypes:
            if q == Q.F16:
                y = x.astype(np.float16).astype(np.float32)
            elif q == Q.F32:
                continue
            else:
                y = dequantize(quantize(x, q, a), q)
            err[q] += float(((y - x).astype(np.float64) ** 2 @ scale).sum())
    return {q: e / signal if signal > 0 else 0.0 for q, e in err.items()}


def hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (cost, loss), cheapest first: the points worth taking in order, each
    saving less loss per byte than the step before it (dominated and concave points dropped)."""
    best: dict[int, Option] = {}
    for o in options:
        if o.cost not in best or o.loss < best[o.cost].loss:
            best[o.cost] = o
    pts = []
    for o in sorted(best.values(), key=lambda o: o.cost):
        if pts and o.loss >= pts[-1].loss:
            continue  # costs more, loses no less
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a -> o: never the best step
            if (b.loss - a.loss) * (o.cost - a.cost) >= (o.loss - a.loss) * (b.cost - a.cost):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: Mapping[str, list[Option]], limit: int) -> dict[str, Option]:
    """Per tensor the option minimising the summed loss with the summed cost <= limit. First greedy on
    the convex hulls (the Lagrangian optimum at every hull vertex, then whatever smaller steps still
    fit), then exchanges among all options, hull or not: the one change, or pair of changes to two
    tensors (one may give bytes back), that lowers the loss most and fits, until none does.
    Raises ValueError when even the cheapest options exceed the limit."""
    hulls = {name: hull(opts) for name, opts in options.items()}
    at = dict.fromkeys(hulls, 0)
    used = sum(h[0].cost for h in hulls.values())
    if used > limit:
        raise ValueError(f"the cheapest options take {used} bytes, over the limit of {limit}")

    def step(name: str):
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain, cost = h[i].loss - h[i + 1].loss, h[i + 1].cost - h[i].cost
            heapq.heappush(heap, (-gain / cost, name))

    heap: list = []
    for name in hulls:
        step(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1].cost - h[i].cost
        if used + extra <= limit:
            used += extra
            at[name] = i + 1
            step(name)
        # else: this tensor's later steps need this one; others' cheaper steps may still fit
    chosen = {name: hulls[name][at[name]] for name in hulls}
    return _exchange(options, chosen, limit - used)


def _exchange(options: Mapping[str, list[Option]], chosen: dict[str, Option], spare: int,
              max_rounds: int = 10000) -> dict[str, Option]:
    """Improve `chosen` by single changes and pairs of changes (on two tensors) that fit in `spare`
    bytes and lower the summed loss, the best first."""
    names = list(options)
    index = {n: i for i, n in enumerate(names)}
    moves = [(index[n], o) for n in names for o in options[n]]
    tensor = np.array([t for t, _ in moves])
    cost = np.array([o.cost for _, o in moves], dtype=np.float64)
    loss = np.array([o.loss for _, o in moves], dtype=np.float64)
    chosen = dict(chosen)
    block = max(1, (1 << 22) // max(len(moves), 1))  # rows of the pair table at a time
    for _ in range(max_rounds):
        cur_cost = np.array([chosen[names[t]].cost for t in tensor], dtype=np.float64)
        cur_loss = np.array([chosen[names[t]].loss for t in tensor], dtype=np.float64)
        dc, dl = cost - cur_cost, loss - cur_loss
        eps = 1e-12 * max(1.0, float(np.abs(cur_loss).sum()))
        best, pick = -eps, None
        single = np.where(dc <= spare, dl, np.inf)
        if len(single) and single.min() < best:
            best, pick = float(single.min()), (int(single.argmin()),)
        for a in range(0, len(moves), block):
            pair_dc = dc[a:a + block, None] + dc[None, :]
            pair_dl = dl[a:a + block, None] + dl[None, :]
            ok = (pair_dc <= spare) & (tensor[a:a + block, None] != tensor[None, :])
            pair_dl = np.where(ok, pair_dl, np.inf)
            k = int(pair_dl.argmin())
            if pair_dl.flat[k] < best:
                best, pick = float(pair_dl.flat[k]), (a + k // len(moves), k % len(moves))
        if pick is None:
            break
        for m in pick:
            spare -= int(dc[m])
            chosen[names[tensor[m]]] = moves[m][1]
    return chosen


def plan(metas: list[TensorMeta], model: ModelInfo, mixture: str, target: Target, data_offset: int, alignment: int,
         rows: Callable[[str], Iterable[tuple[int, np.ndarray]]], weights: Mapping[str, np.ndarray],
         opts: Options | None = None, has_imatrix: bool = False, source=None,
         kind_weights: Mapping[str, float] | None = None, progress=None) -> Plan:
    """Choose every tensor's type for `target`, starting from `mixture`'s rules (which tensors it
    quantizes, what the user pins). `data_offset`/`alignment`: where the file's tensor data starts
    and its padding (gguffile.writer.data_offset); `rows(name)`: the tensor's float rows as
    (expert, rows) chunks; `weights`: importance data per tensor (absent: unweighted). `source`
    names the input in errors."""
    opts = opts or Options()
    metas = llama_order(metas)
    start = choose_types(metas, model, mixture, opts, has_imatrix=has_imatrix)
    names = set(budgeted(metas, opts))
    by_name = {t.name: t for t in metas}
    n_params = sum(int(np.prod(t.ne, dtype=np.int64)) for t in metas)
    bpw = target.bpw is not None

    def cost(t: TensorMeta, q) -> int:
        n = tensor_bytes(t.ne, q)
        return n if bpw else padded(n, alignment)

    fixed = sum(cost(t, start[t.name]) for t in metas if t.name not in names) + (0 if bpw else data_offset)
    if target.size is not None:
        limit = target.size
    elif bpw:
        limit = int(target.bpw * n_params // 8)
    else:
        ref = choose_types(metas, model, target.match, opts, has_imatrix=has_imatrix)
        limit = data_offset + sum(cost(t, ref[t.name]) for t in metas)
    cands = {n: candidates(by_name[n], start[n], has_imatrix, mixture) for n in names}
    smallest = fixed + sum(cost(by_name[n], c[0]) for n, c in cands.items())
    largest = fixed + sum(cost(by_name[n], Q.F16) for n in names)
    show = (lambda v: f"{8 * v / n_params:.3f} bits/w") if bpw else (lambda v: f"{v} bytes ({v / 1e6:.1f} MB)")
    if limit < smallest:
        raise GgufkitError(f"{target} is below the smallest file these types allow: {show(smallest)}", source)
    if limit > largest:
        raise GgufkitError(f"{target} is above the F16 size of this model ({show(largest)}): "
                           f"use --type F16 (or a larger mixture) instead", source)
    options = {}
    tied = "output.weight" not in by_name
    n_layer = model.n_layer or len({layer_of(t.name) for t in metas} - {-1})
    for i, n in enumerate(t.name for t in metas if t.name in names):
        t = by_name[n]
        rel = relative_errors(rows(n), t.ne, cands[n], weights.get(n))
        k = loss_weight(n, n_layer, tied, kind_weights)
        options[n] = [Option(q, cost(t, q), k * rel[q]) for q in cands[n]]
        if progress is not None:
            progress(i + 1, len(names))
    chosen = allocate(options, limit - fixed)
    types = {t.name: chosen[t.name].qtype if t.name in chosen else start[t.name] for t in metas}
    used = fixed + sum(o.cost for o in chosen.values())
    file_bytes = data_offset + sum(padded(tensor_bytes(t.ne, types[t.name]), alignment) for t in metas)
    return Plan(types, target, limit, used, file_bytes, n_params, sum(o.loss for o in chosen.values()),
                [t.name for t in metas if t.name in names], {n: o.loss for n, o in chosen.items()}, options)


def describe(p: Plan) -> str:
    """The chosen types per tensor kind (a row per kind, a column per type: tensor counts), then the
    budget against what the file takes."""
    kinds: dict[str, dict[str, int]] = {}
    for n in p.budgeted:
        row = kinds.setdefault(category(n), {})
        row[p.types[n].name] = row.get(p.types[n].name, 0) + 1
    used_types = sorted({q for row in kinds.values() for q in row},
                        key=lambda name: (GGML_QUANT_SIZES[Q[name]][1] * 256 / GGML_QUANT_SIZES[Q[name]][0], name))
    width = max([len(k) for k in kinds] + [4])
    lines = [f"{'kind':<{width}} " + " ".join(f"{q:>7}" for q in used_types)]
    for kind, row in sorted(kinds.items()):
        lines.append(f"{kind:<{width}} " + " ".join(f"{row.get(q, 0) or '':>7}" for q in used_types))
    if p.target.bpw is not None:
        budget = f"{8 * p.limit / p.n_params:.3f} bits/w, used {8 * p.used / p.n_params:.3f}"
    else:
        budget = f"{p.limit} bytes, file {p.file_bytes} bytes ({p.limit - p.file_bytes} to spare)"
    lines.append(f"budget ({p.target}): {budget}; {8 * (p.file_bytes) / p.n_params:.3f} bits/w of file, "
                 f"predicted loss {p.loss:.4g}")
    return "\n".join(lines)
