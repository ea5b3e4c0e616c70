"""ggml's per-block scale searches, compiled, over several blocks at once.

Each search takes blocks in lanes: x and weights are float32 (n, lanes) arrays, column k holding
block k, and every loop runs `for i in range(n): for k in range(lanes)`. Each lane is computed in
exactly ggml's order (a sequential sum per block, C's comparisons, its first-occurrence rules), so
bytes match ggml; the lanes themselves are independent, which lets the compiler put a vector of
blocks through every candidate scale at once where ggml's scalar C takes one block at a time.
Where ggml branches per block, a lane computes both sides and keeps the one its block takes.
"""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import F32, GROUP_MAX_EPS, inline, lane_mat, lane_vec, level_f, nearest_f, nearest_int

# Below this, round_f's float rounding equals ggml's nearest_int (exact up to 2^22).
BOUND = np.float32(2**21)

# Lanes per call: 16 float32, one AVX-512 vector (two AVX2 ones).
LANES = 16


@inline
def gather_blocks(x, first, n, n_blocks, xt):
    """Blocks first..first+LANES-1 of length n of the flat x into lanes (zero past the last one)."""
    for k in range(LANES):
        b = first + k
        for i in range(n):
            xt[i, k] = x[b * n + i] if b < n_blocks else F32(0)


@inline
def signed_absmax(x, mx, amax):
    """Per lane `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from 0: the first element of
    largest magnitude (mx) and its magnitude (amax); NaN never wins."""
    n, lanes = x.shape[0], LANES
    for k in range(lanes):
        mx[k] = 0
        amax[k] = 0
    for i in range(n):
        for k in range(lanes):
            ax = abs(x[i, k])
            if ax > amax[k]:
                amax[k] = ax
                mx[k] = x[i, k]


@inline
def all_finite(x):
    """Whether every value in the lanes is finite (searches over intermediate values, such as a
    super-block's overflowed scales, may see inf or NaN)."""
    n, lanes = x.shape[0], LANES
    bad = 0
    for i in range(n):
        for k in range(lanes):
            bad |= not abs(x[i, k]) < np.inf
    return bad == 0


@inline
def _qx_sums(x, w, iscale, lo, hi, acc, exact):
    """Per lane sum(w*x*l) into acc[0] and sum(w*l*l) into acc[1]. Accumulators live in one array:
    with one array per sum the compiler's alias checks give up and the loop runs scalar (7x slower)."""
    n, lanes = x.shape[0], LANES
    for k in range(lanes):
        acc[0, k] = 0
        acc[1, k] = 0
    for i in range(n):
        for k in range(lanes):
            lf = level_f(iscale[k] * x[i, k], lo, hi, exact)  # |arg| <= nmax + 1 for finite x
            acc[0, k] += w[i, k] * x[i, k] * lf
            acc[1, k] += w[i, k] * lf * lf


@inline
def make_qx_quants(x, w, nmax, L, scale):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) per lane: L (n, lanes) uint8 levels in
    [0, 2*nmax - 1], scale (lanes,). ggml's qw=NULL is w = x*x, filled in by the caller."""
    n, lanes = x.shape[0], LANES
    lo, hi = F32(-nmax), F32(nmax - 1)
    mx, amax = lane_vec(F32), lane_vec(F32)
    signed_absmax(x, mx, amax)
    exact = not all_finite(x)
    iscale, best_iscale = lane_vec(F32), lane_vec(F32)
    acc, best = lane_mat(2, F32), lane_vec(F32)
    for k in range(lanes):
        iscale[k] = F32(-nmax) / mx[k]
    _qx_sums(x, w, iscale, lo, hi, acc, exact)
    for k in range(lanes):
        s = acc[0, k] / acc[1, k] if acc[1, k] != 0 else F32(0)
        scale[k] = s
        best[k] = s * acc[0, k]
        best_iscale[k] = iscale[k]
    for step in range(-9, 10):
        if step == 0:
            continue
        for k in range(lanes):
            iscale[k] = -(F32(nmax) + F32(0.1) * F32(step)) / mx[k]
        _qx_sums(x, w, iscale, lo, hi, acc, exact)
        for k in range(lanes):  # selects, not branches: this loop vectorizes too
            sumlx, suml2 = acc[0, k], acc[1, k]
            better = (suml2 > 0) & (sumlx * sumlx > best[k] * suml2)
            s = sumlx / suml2
            scale[k] = s if better else scale[k]
            best[k] = s * sumlx if better else best[k]
            best_iscale[k] = iscale[k] if better else best_iscale[k]
    for i in range(n):
        for k in range(lanes):
            L[i, k] = np.uint8(level_f(best_iscale[k] * x[i, k], lo, hi, exact) + F32(nmax))
    for k in range(lanes):
        if amax[k] < GROUP_MAX_EPS:  # all zero: ggml returns 0 with L = 0
            scale[k] = 0
            for i in range(n):
                L[i, k] = 0


@inline
def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, L, scale, the_min):
    """make_qkx2_quants / make_qkx3_quants per lane (the same search; ggml's qkx3 with weights=NULL
    means w = x*x, filled in by the caller): L (n, lanes) uint8 in [0, nmax], scale and the_min
    (lanes,), x ~ scale*L - the_min."""
    n, lanes = x.shape[0], LANES
    fmax, frmin, frdelta = F32(nmax), F32(rmin), F32(rdelta)
    zero = F32(0)
    mn, mx = lane_vec(F32), lane_vec(F32)
    sum_w, sum_x = lane_vec(F32), lane_vec(F32)
    for k in range(lanes):
        mn[k] = x[0, k]
        mx[k] = x[0, k]
        sum_w[k] = w[0, k]
        sum_x[k] = sum_w[k] * x[0, k]
    for i in range(1, n):
        for k in range(lanes):
            v = x[i, k]
            if v < mn[k]:
                mn[k] = v
            if v > mx[k]:
                mx[k] = v
            sum_w[k] += w[i, k]
            sum_x[k] += w[i, k] * v
    flat = lane_vec(np.uint8)  # booleans as 0/1 bytes
    lowest = lane_vec(F32)  # the block minimum, before min is capped at 0
    iscale, best = lane_vec(F32), lane_vec(F32)
    # The levels of the best step are recomputed at the end from its scale and min (cheaper than
    # copying them at every improvement).
    best_iscale, best_mn = lane_vec(F32), lane_vec(F32)
    for k in range(lanes):
        lowest[k] = mn[k]
        best[k] = 0
        if mn[k] > 0:
            mn[k] = 0
        flat[k] = mx[k] <= mn[k]
        iscale[k] = fmax / (mx[k] - mn[k])
        scale[k] = F32(1) / iscale[k]
        best_iscale[k] = iscale[k]
        best_mn[k] = mn[k]
    exact = False  # |iscale*(x - min)| <= nmax unless max - min overflowed
    for k in range(lanes):
        exact |= flat[k] == 0 and not abs(iscale[k]) * (mx[k] - mn[k]) < BOUND
    for i in range(n):
        for k in range(lanes):
            lf = level_f(iscale[k] * (x[i, k] - mn[k]), zero, fmax, exact)
            diff = scale[k] * lf + mn[k] - x[i, k]
            best[k] += w[i, k] * (abs(diff) if use_mad else diff * diff)
    aux = lane_mat(n, F32)
    # sum_l, sum_l2, sum_xl, error: one array (see _qx_sums)
    acc = lane_mat(4, F32)
    this_scale, this_min = lane_vec(F32), lane_vec(F32)
    take = lane_vec(np.uint8)
    for step in range(nstep + 1):
        exact = False  # later steps' min comes from a fit: bound |iscale*(x - min)| per lane
        for k in range(lanes):
            iscale[k] = (frmin + frdelta * F32(step) + fmax) / (mx[k] - mn[k])
            for r in range(4):
                acc[r, k] = 0
            reach = abs(iscale[k]) * max(abs(mx[k] - mn[k]), abs(lowest[k] - mn[k]))
            exact |= flat[k] == 0 and not reach < BOUND
        for i in range(n):
            for k in range(lanes):
                lf = level_f(iscale[k] * (x[i, k] - mn[k]), zero, fmax, exact)
                aux[i, k] = lf
                wl = w[i, k] * lf
                acc[0, k] += wl
                acc[1, k] += wl * lf
                acc[2, k] += wl * x[i, k]
        for k in range(lanes):
            sum_l, sum_l2, sum_xl = acc[0, k], acc[1, k], acc[2, k]
            D = sum_w[k] * sum_l2 - sum_l * sum_l
            take[k] = (D > 0) & (flat[k] == 0)
            ts = (sum_w[k] * sum_xl - sum_x[k] * sum_l) / D
            tm = (sum_l2 * sum_x[k] - sum_l * sum_xl) / D
            positive = tm > 0
            this_scale[k] = sum_xl / sum_l2 if positive else ts
            this_min[k] = zero if positive else tm
        for i in range(n):
            for k in range(lanes):
                diff = this_scale[k] * aux[i, k] + this_min[k] - x[i, k]
                acc[3, k] += w[i, k] * (abs(diff) if use_mad else diff * diff)
        for k in range(lanes):
            t = (take[k] == 1) & (acc[3, k] < best[k])
            best[k] = acc[3, k] if t else best[k]
            scale[k] = this_scale[k] if t else scale[k]
            best_iscale[k] = iscale[k] if t else best_iscale[k]
            best_mn[k] = mn[k] if t else best_mn[k]  # the min these levels were computed from
            mn[k] = this_min[k] if t else mn[k]  # ggml updates min inside the loop: later steps use it
    exact = False
    for k in range(lanes):
        reach = abs(best_iscale[k]) * max(abs(mx[k] - best_mn[k]), abs(lowest[k] - best_mn[k]))
        exact |= flat[k] == 0 and not reach < BOUND
    for i in range(n):
        for k in range(lanes):
            lf = level_f(best_iscale[k] * (x[i, k] - best_mn[k]), zero, fmax, exact)
            L[i, k] = 0 if flat[k] == 1 else np.uint8(lf)
    for k in range(lanes):
        if flat[k] == 1:
            scale[k] = 0
        the_min[k] = -mn[k]


@inline
def make_q3_quants(x, nmax, L, scale):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) per lane (w = x*x): L (n, lanes) uint8 in
    [0, 2*nmax - 1], scale (lanes,)."""
    n, lanes = x.shape[0], LANES
    lo, hi = F32(-nmax), F32(nmax - 1)
    mx, amax, iscale = lane_vec(F32), lane_vec(F32), lane_vec(F32)
    signed_absmax(x, mx, amax)
    lf = lane_mat(n, F32)
    acc = lane_mat(2, F32)  # sumlx, suml2 (one array: see _qx_sums)
    for k in range(lanes):
        iscale[k] = F32(-nmax) / mx[k]
        acc[0, k] = 0
        acc[1, k] = 0
    for i in range(n):
        for k in range(lanes):
            v = x[i, k]
            l = nearest_f(iscale[k] * v, lo, hi)
            lf[i, k] = l
            w = v * v
            acc[0, k] += w * v * l
            acc[1, k] += w * l * l
    # A block with no change in a whole pass is at a fixed point (another pass changes nothing), so
    # running the passes while any lane changes equals ggml's per-block early exit.
    for _ in range(5):
        changed = 0
        for i in range(n):
            for k in range(lanes):
                v = x[i, k]
                w = v * v
                li = lf[i, k]
                sumlx, suml2 = acc[0, k], acc[1, k]
                slx = sumlx - w * v * li
                sl2 = suml2 - w * li * li
                new_l = nearest_f(v * sl2 / slx, lo, hi)
                nslx = slx + w * v * new_l
                nsl2 = sl2 + w * new_l * new_l
                take = (slx > 0) & (new_l != li) & (nsl2 > 0) & (nslx * nslx * suml2 > sumlx * sumlx * nsl2)
                lf[i, k] = new_l if take else li
                acc[0, k] = nslx if take else sumlx
                acc[1, k] = nsl2 if take else suml2
                changed += take
        if changed == 0:
            break
    for k in range(lanes):
        zero = amax[k] < GROUP_MAX_EPS
        scale[k] = 0 if zero or not acc[1, k] > 0 else acc[0, k] / acc[1, k]
        for i in range(n):
            L[i, k] = 0 if zero else np.uint8(lf[i, k] + F32(nmax))


@inline
def make_qp_quants(x, w, nmax, L):
    """make_qp_quants(n, nmax, x, L, w) for one short block (x, w 1-D: a super-block's scales or mins):
    non-negative levels; returns the scale. Like ggml, L is uint8: a negative level (negative x) is
    stored modulo 256, and the refinement reads that stored value back."""
    n = x.shape[0]
    mx = F32(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0)
    iscale = F32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F32(1) / iscale
    best_mse = F32(0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
        scale_is = F32(1) / iscale_is
        mse = F32(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += w[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx, suml2 = F32(0), F32(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx += w[i] * x[i] * F32(l)
        suml2 += w[i] * F32(l) * F32(l)
    for _ in range(5):
        changed = False
        for i in range(n):
            li = F32(L[i])
            slx = sumlx - w[i] * x[i] * li
            sl2 = suml2 - w[i] * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w[i] * x[i] * F32(new_l)
                    sl2 += w[i] * F32(new_l) * F32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > 0 else F32(0)
