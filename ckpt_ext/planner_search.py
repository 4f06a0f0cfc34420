"""Exact search for the planner's per-layer mix: identical layers, one memory budget.

Given L layers and k options (each with activation bytes m_i, recompute workspace bytes w_i and step time t_i), find
counts n_i >= 0 with sum n_i = L that minimize (sum n_i t_i, peak), peak = sum n_i m_i + max_{n_i > 0} w_i, subject to
peak <= room (the budget minus model state). The brute force scores every composition of L into k parts: O(L^(k-1)).

1. Workspace: fix the largest workspace allowed, cap = w_j (k choices). Only options with w_i <= cap may be used and
   the memory limit becomes sum n_i m_i <= room - cap. Every plan is feasible under the cap of its own largest
   workspace, and under any cap a solution's true peak is at most its capped one, so the best over caps (scored with
   the true peak) is the exact optimum.
2. Dominance: with the workspace fixed, an option that is at least as slow and at least as large as another one is
   never needed (swapping it for the other costs neither time nor memory). The rest, sorted by memory, is a front:
   m_0 < m_1 < ... and t_0 > t_1 > ... (p <= k <= 5 options; the planner has k = 5).
3. p <= 2 is closed form: as many layers as the memory left allows take the faster option 1,
   n_1 = min(r, floor((room - r m_0) / (m_1 - m_0))), the rest option 0 (fastest, and among the fastest the smallest).
   p >= 3: a row fixes the counts of options 3..p-1 (one row for p = 3, n_3 = 0..L for p = 4); within a row,
   n_2 = 0..L is enumerated and n_0, n_1 closed as above (one vectorized pass, O(L)). A row's time is at least its
   linear-programming bound: its own options' time + r h(room' / r), h the lower convex hull of options 0-2's (m, t)
   points, r the layers and room' the bytes the row leaves. Rows are scanned in order of that bound and the scan
   stops at the first row whose bound exceeds the best time found. p = 5: the same one level up: n_4 = 0..L in
   order of its bound over options 0-3, each n_4's rows as for p = 4, stopping at the first n_4 whose bound exceeds
   the best. The integer optimum lies within about one layer's time of the bound, so a handful of rows is the usual
   cost, O(L) per row and per level; the worst case (every row) is O(L^(p-2)) elementwise.
Memory is int64 bytes (exact); times are float64. Ties (equal time) go to less memory, as in the planner.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_ROWS = 8  # rows evaluated per tensor pass (each row: n_2 = 0..L)


def fastest_mix(
    n_layers: int, mem: Sequence[int], work: Sequence[int], time: Sequence[float], room: int
) -> Optional[tuple[int, ...]]:
    """Counts per option of the fastest mix whose activations + workspace fit in ``room`` bytes; None if none fits."""
    _check(n_layers, mem, work, time)
    best = None  # (time, peak, counts)
    for cap in sorted(set(work)):
        front = _front([i for i in range(len(mem)) if work[i] <= cap], mem, time)
        if best is not None and n_layers * time[front[-1]] > best[0]:
            continue  # every layer on this cap's fastest option is still slower than the best found
        found = _fastest_on_front(n_layers, [mem[i] for i in front], [time[i] for i in front], room - cap)
        if found is None:
            continue
        counts = [0] * len(mem)
        for i, n in zip(front, found):
            counts[i] = n
        scored = (*score(counts, mem, work, time), tuple(counts))
        if best is None or scored[:2] < best[:2]:
            best = scored
    return None if best is None else best[2]


def leanest_mix(n_layers: int, mem: Sequence[int], work: Sequence[int], time: Sequence[float]) -> tuple[int, ...]:
    """Counts of the mix with the smallest peak (ties: faster). Under a workspace cap the leanest plan puts every
    layer on the smallest allowed option, so the best single-option plan is the exact minimum."""
    _check(n_layers, mem, work, time)
    plans = [tuple(n_layers if j == i else 0 for j in range(len(mem))) for i in range(len(mem))]
    return min(plans, key=lambda c: score(c, mem, work, time)[::-1])


def score(counts: Sequence[int], mem, work, time) -> tuple[float, int]:
    """(total time, peak bytes) of one count vector."""
    t = sum(n * x for n, x in zip(counts, time))
    peak = sum(n * m for n, m in zip(counts, mem)) + max(w for n, w in zip(counts, work) if n)
    return t, peak


def _check(n_layers, mem, work, time) -> None:
    if not (len(mem) == len(work) == len(time)) or not mem:
        raise ValueError("mem, work and time must be non-empty and of equal length")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if len(mem) > 5:
        raise ValueError(f"the exact search handles at most 5 options, got {len(mem)}")
    if n_layers * max(mem) + max(work) >= 2**62:
        raise ValueError("memory sizes too large for exact int64 arithmetic")


def _front(allowed: list[int], mem, time) -> list[int]:
    """Undominated options among ``allowed``, by increasing memory (and so strictly decreasing time)."""
    front: list[int] = []
    for i in sorted(allowed, key=lambda i: (mem[i], time[i])):
        if not front or time[i] < time[front[-1]]:
            front.append(i)
    return front


def _fastest_on_front(n_layers: int, mem: list[int], time: list[float], room: int) -> Optional[tuple[int, ...]]:
    """Fastest counts (ties: less memory) with sum n_i m_i <= room on a front (m increasing, t decreasing)."""
    p = len(mem)
    if n_layers * mem[0] > room:
        return None
    if p == 1 or n_layers * mem[-1] <= room:  # the fastest option fits on every layer
        return tuple(n_layers if i == p - 1 else 0 for i in range(p))
    if p == 2:
        n1 = min(n_layers, (room - n_layers * mem[0]) // (mem[1] - mem[0]))
        return (n_layers - n1, n1)
    if p == 3:
        found = _scan_rows(n_layers, torch.zeros(1, 0, dtype=torch.int64), mem, time, room, None)
    elif p == 4:
        found = _scan_rows(n_layers, torch.arange(n_layers + 1)[:, None], mem, time, room, None)
    else:  # p == 5: n_4 in order of its bound over options 0-3, then the n_3 rows of each n_4 as for p == 4
        n4 = torch.arange(n_layers + 1)  # (L+1,)
        bound = n4.double() * time[4] + _hull_bound(n_layers - n4, room - n4 * mem[4], mem[:4], time[:4])
        found = None
        for i in bound.argsort().tolist():
            if found is not None and float(bound[i]) > found[0] * (1 + 1e-12):
                break
            n3 = torch.arange(n_layers - i + 1)  # (L-n_4+1,)
            tops = torch.stack([n3, torch.full_like(n3, i)], 1)  # (R, 2) counts of options 3 and 4
            found = _scan_rows(n_layers, tops, mem, time, room, found)
    return None if found is None else found[2]


def _scan_rows(n_layers: int, tops: torch.Tensor, mem, time, room: int, best):
    """Best (time, memory, counts) over ``best`` and the rows of ``tops`` (R, p-3), fixed counts of options 3..p-1;
    rows go in order of their bound (options 0-2 relaxed) and the scan stops once a bound exceeds the best time."""
    top_layers = tops.sum(1)  # (R,)
    top_bytes = _weighted(tops, mem[3:])  # (R,) int64
    top_time = _weighted(tops.double(), time[3:])  # (R,) float64
    bound = top_time + _hull_bound(n_layers - top_layers, room - top_bytes, mem[:3], time[:3])  # (R,)
    order = bound.argsort()  # rows by increasing lower bound
    for start in range(0, len(order), _ROWS):
        rows = order[start : start + _ROWS]
        if best is not None and float(bound[rows[0]]) > best[0] * (1 + 1e-12):
            break  # no remaining row can be as fast as the best found
        cand = _best_in_rows(n_layers, tops[rows], mem, time, room)
        if cand is not None and (best is None or cand[:2] < best[:2]):
            best = cand
    return best


def _weighted(counts: torch.Tensor, weights) -> torch.Tensor:
    """(R,) sum_j counts[:, j] * weights[j] column by column (an int64 matmul has no fast CPU kernel)."""
    out = torch.zeros(counts.shape[0], dtype=counts.dtype)
    for j, w in enumerate(weights):
        out += counts[:, j] * w
    return out


def _hull_bound(r: torch.Tensor, room: torch.Tensor, mem: list[int], time: list[float]) -> torch.Tensor:
    """(R,) lower bound on the time of r layers on the given options within ``room`` bytes: r h(room / r), h the
    lower convex hull of the points (m_i, t_i), which is decreasing; +inf where even option 0 does not fit."""
    pts = [(mem[0], time[0])]
    for m, t in zip(mem[1:], time[1:]):
        while len(pts) >= 2 and _above(pts[-2], pts[-1], (m, t)):
            pts.pop()
        pts.append((m, t))
    per_layer = room.double() / r.clamp_min(1).double()  # (R,) bytes a layer may use on average
    h = torch.full_like(per_layer, pts[-1][1])
    for (m_a, t_a), (m_b, t_b) in zip(pts, pts[1:]):
        h = torch.maximum(h, t_a + (per_layer - m_a) * ((t_b - t_a) / (m_b - m_a)))
    out = r.double() * h
    return torch.where((room < r * mem[0]) | (room < 0), float("inf"), out)


def _above(a, b, c) -> bool:
    """True when b lies on or above the segment a-c (so it is not a vertex of the lower hull)."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])


def _best_in_rows(n_layers: int, tops: torch.Tensor, mem: list[int], time: list[float], room: int):
    """Fastest (time, memory, counts) over the rows of ``tops`` (counts of options 3..p-1) and every n_2, with n_0
    and n_1 in closed form; None if nothing fits."""
    width = n_layers + 1
    top = tops.repeat_interleave(width, dim=0)  # (G, p-3)
    n2 = torch.arange(width, dtype=torch.int64).repeat(len(tops))  # (G,)
    r = n_layers - top.sum(1) - n2  # (G,) layers left for options 0 and 1
    top_bytes = _weighted(top, mem[3:])  # (G,)
    left = room - top_bytes - n2 * mem[2] - r * mem[0]  # (G,) bytes beyond putting those r layers on option 0
    ok = (r >= 0) & (left >= 0)
    n1 = torch.minimum(r, torch.div(left.clamp_min(0), mem[1] - mem[0], rounding_mode="floor"))  # (G,)
    t = (r - n1).double() * time[0] + n1.double() * time[1] + n2.double() * time[2] + _weighted(top.double(), time[3:])
    t = torch.where(ok, t, float("inf"))  # (G,)
    t_min = float(t.min())
    if t_min == float("inf"):
        return None
    used = top_bytes + n2 * mem[2] + r * mem[0] + n1 * (mem[1] - mem[0])  # (G,)
    i = int(torch.where(t == t_min, used, torch.iinfo(torch.int64).max).argmin())
    return t_min, int(used[i]), (int(r[i] - n1[i]), int(n1[i]), int(n2[i]), *map(int, top[i]))
