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
   m_0 < m_1 < ... and t_0 > t_1 > ... (p <= k options; the planner has k = 4).
3. p <= 2 is closed form: as many layers as the memory left allows take the faster option 1,
   n_1 = min(r, floor((room - r m_0) / (m_1 - m_0))), the rest option 0 (fastest, and among the fastest the smallest).
   p = 3: enumerate n_2 (0..L) and close n_0, n_1 as above: one vectorized pass, O(L).
   p = 4: the same for each n_3 (a row of the (n_3, n_2) triangle). A row's time is at least its linear-programming
   bound n_3 t_3 + r h(room' / r) (h: the lower convex hull of options 0-2's (m, t) points, r = L - n_3 layers,
   room' = room - n_3 m_3), so rows are scanned in order of that bound and the scan stops at the first row whose
   bound exceeds the best time found. The integer optimum lies within about one layer's time of the bound, so a
   handful of rows (O(L) work) is the usual cost; the worst case (all rows) is O(L^2) elementwise, still vectorized.
Memory is int64 bytes (exact); times are float64. Ties (equal time) go to less memory, as in the planner.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_ROWS = 64  # rows of the (n_3, n_2) triangle evaluated per tensor pass


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
    if len(mem) > 4:
        raise ValueError(f"the exact search handles at most 4 options, got {len(mem)}")
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
    tops = torch.arange(n_layers + 1 if p == 4 else 1, dtype=torch.int64)  # (R,) candidate n_3 (just 0 when p == 3)
    bound = tops.double() * (time[3] if p == 4 else 0.0) + _hull_bound(
        n_layers - tops, room - tops * mem[-1], mem, time
    )
    order = bound.argsort()  # rows by increasing lower bound
    best = None  # (time, memory, counts)
    for start in range(0, len(order), _ROWS):
        rows = order[start : start + _ROWS]
        if best is not None and float(bound[rows[0]]) > best[0] * (1 + 1e-12):
            break  # no remaining row can be as fast as the best found
        cand = _best_in_rows(n_layers, tops[rows], mem, time, room)
        if cand is not None and (best is None or cand[:2] < best[:2]):
            best = cand
    return None if best is None else best[2][:p]


def _hull_bound(r: torch.Tensor, room: torch.Tensor, mem: list[int], time: list[float]) -> torch.Tensor:
    """(R,) lower bound on the time of r layers on options 0-2 within ``room`` bytes: r h(room / r), h the lower
    convex hull of the points (m_i, t_i), i < 3, which is decreasing; +inf where even option 0 does not fit."""
    pts = [(mem[0], time[0])]
    for m, t in zip(mem[1:3], time[1:3]):
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
    """Fastest (time, memory, (n_0, n_1, n_2, n_3)) over the rows n_3 in ``tops`` and every n_2; None if none fits."""
    m3 = mem[3] if len(mem) == 4 else 0
    t3 = time[3] if len(time) == 4 else 0.0
    width = n_layers + 1
    n3 = tops.repeat_interleave(width)  # (G,)
    n2 = torch.arange(width, dtype=torch.int64).repeat(len(tops))  # (G,)
    r = n_layers - n3 - n2  # (G,) layers left for options 0 and 1
    left = room - n3 * m3 - n2 * mem[2] - r * mem[0]  # (G,) bytes beyond putting those r layers on option 0
    ok = (r >= 0) & (left >= 0)
    n1 = torch.minimum(r, torch.div(left.clamp_min(0), mem[1] - mem[0], rounding_mode="floor"))  # (G,)
    counts = torch.stack([r - n1, n1, n2, n3], 1).double()  # (G, 4)
    t = counts @ torch.tensor([*time[:3], t3], dtype=torch.float64)  # (G,)
    t = torch.where(ok, t, float("inf"))
    t_min = float(t.min())
    if t_min == float("inf"):
        return None
    used = n3 * m3 + n2 * mem[2] + r * mem[0] + n1 * (mem[1] - mem[0])  # (G,)
    i = int(torch.where(t == t_min, used, torch.iinfo(torch.int64).max).argmin())
    return t_min, int(used[i]), (int(r[i] - n1[i]), int(n1[i]), int(n2[i]), int(n3[i]))
