"""bench.host smoke test (no timed assertions): every variant runs and is counted, and the fused block's op count
per step is what its graph issues (the round-robin timer and the "noisy" rule are tested in test_bench_cpu.py)."""

from bench import host


def test_host_rows_every_variant_and_op_counts():
    rows = host.run("llama", d=24, heads=4, seq=3, batch=1, min_time=0.0)
    names = [r["variant"] for r in rows]
    assert names[:2] == ["TransformerBlock", "torch checkpoint"]
    assert len(names) == 2 + len(host.BACKENDS) * len(host.POLICIES)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["TransformerBlock"]["ckpt_ops"] == 0
    for backend in host.BACKENDS:
        counts = [by_name[f"{backend} {p}"]["ckpt_ops"] for p in ("none", "block_keep_attn", "block")]
        assert 0 < counts[0] < counts[1] < counts[2]  # block replays the attention half: more ops than none
    assert "| cpp block |" in host.format_table(rows)
    assert all(r["vs_eager"] == "noisy" or r["vs_eager"].endswith("x") for r in rows)


def test_dispatch_cost_rows():
    costs = host.dispatch_cost(min_time=0.0)
    assert "ckpt_ext::layer_norm_fwd (cpp)" in costs and all(t.median > 0 for t in costs.values())
