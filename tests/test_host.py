"""bench.host smoke test (no timed assertions): every variant runs and is counted (the torch.compile row is timed,
not counted), and the fused block's op count per step is what its graph issues (the round-robin timer and the "noisy"
rule are tested in test_bench_cpu.py)."""

from bench import host


def test_host_rows_every_variant_and_op_counts():
    rows = host.run("llama", d=24, heads=4, seq=3, batch=1, min_time=0.0)
    names = [r["variant"] for r in rows]
    assert names[:2] == ["TransformerBlock", "torch checkpoint"]
    assert len(names) == 2 + len(host.BACKENDS) * len(host.POLICIES) + 1 and names[-1] == host.COMPILED
    by_name = {r["variant"]: r for r in rows}
    assert by_name["TransformerBlock"]["ckpt_ops"] == 0
    for backend in host.BACKENDS:
        counts = [by_name[f"{backend} {p}"]["ckpt_ops"] for p in ("none", "block_keep_attn", "block")]
        assert 0 < counts[0] < counts[1] < counts[2]  # block replays the attention half: more ops than none
    for p in host.POLICIES:  # both backends issue the same op graph
        assert by_name[f"cpp {p}"]["ckpt_ops"] == by_name[f"reference {p}"]["ckpt_ops"]
        assert by_name[f"cpp {p}"]["aten_ops"] == by_name[f"reference {p}"]["aten_ops"]
    table = host.format_table(rows)
    assert "| cpp block |" in table and f"| {host.COMPILED} |" in table
    assert by_name[host.COMPILED]["aten_ops"] is None and by_name[host.COMPILED]["us"] > 0
    assert all(r["vs_eager"] == "noisy" or r["vs_eager"].endswith("x") for r in rows)


def test_dispatch_cost_rows():
    costs = host.dispatch_cost(min_time=0.0)
    assert "ckpt_ext::layer_norm_fwd (cpp)" in costs and all(t.median > 0 for t in costs.values())


def test_triton_path_host_cost_counts_every_launch():
    """bench.host_triton in its own process (it stubs Triton's launch globally): every policy row runs on the triton
    backend, the stub sees launches (so the Triton launchers really ran), and block launches more than none (it replays
    the attention half)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.host_triton", "--family", "llama", "--min-time", "0.01"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {
        line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| ")
    }
    launches = {p: int(rows[f"triton {p}"]) for p in host.POLICIES}
    assert all(n > 0 for n in launches.values()) and launches["block"] > launches["none"]
    assert rows["TransformerBlock"] == ""
