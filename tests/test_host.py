"""bench.host smoke test (no timed assertions): every variant runs and is counted, the ratio logic says "noisy"
when spreads exceed the difference, and the fused block's op count per step is what its graph issues."""

from bench import host


def test_host_rows_every_variant_and_op_counts():
    rows = host.run("llama", d=24, heads=4, seq=3, batch=1, rounds=2, inner=1)
    names = [r["variant"] for r in rows]
    assert names[:2] == ["TransformerBlock", "torch checkpoint"]
    assert len(names) == 2 + len(host.BACKENDS) * len(host.POLICIES)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["TransformerBlock"]["ckpt_ops"] == 0
    for backend in host.BACKENDS:
        counts = [by_name[f"{backend} {p}"]["ckpt_ops"] for p in ("none", "block_keep_attn", "block")]
        assert 0 < counts[0] < counts[1] < counts[2]  # block replays the attention half: more ops than none
    assert "| cpp block |" in host.format_table(rows)


def test_ratio_reports_noise():
    assert host.ratio((100.0, 5.0), (50.0, 5.0)) == "2.00"
    assert host.ratio((100.0, 60.0), (50.0, 5.0)) == "noisy"
    assert host.summary([1.0, 2.0, 3.0, 4.0, 5.0])[0] == 3.0


def test_dispatch_cost_rows():
    costs = host.dispatch_cost(rounds=1, inner=2)
    assert "ckpt_ext layer_norm_fwd (cpp)" in costs and all(med > 0 for med, _ in costs.values())
