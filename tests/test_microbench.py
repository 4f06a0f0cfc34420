"""``python -m bench.microbench`` at a tiny size: every op and provider timed, CSV appended, plots written."""

from __future__ import annotations

import csv
import math

import pytest

from bench import microbench
from bench.micro_report import CSV_FIELDS
from bench.micro_timing import roofline_seconds

TINY = [
    "--batch",
    "2",
    "--seq",
    "16",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--min-time",
    "0.002",
    "--threads",
    "1",
    "--no-progress",
]
OPS = {"layer_norm_fwd", "layer_norm_bwd", "bias_gelu", "gelu_bwd", "dropout_add", "ffn_recompute", "linear_bias_gelu",
       "linear_gelu_bwd", "gelu_linear_wgrad", "attention_fwd", "attention_bwd"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, microbench.main([*TINY, "--out", str(out)])


def _rows(path):
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_op_and_provider_in_csv(tiny_run):
    out, result = tiny_run
    rows = _rows(out / "microbench.csv")
    assert tuple(rows[0]) == CSV_FIELDS
    assert {r["op"] for r in rows} == OPS
    assert {r["provider"] for r in rows} == {"ckpt_ext", "eager"}
    assert {(r["op"], r["mode"]) for r in rows} >= {("dropout_add", "fwd"), ("dropout_add", "bwd")}
    metrics = {r["metric"] for r in rows}
    assert {"time_median_ms", "time_q20_ms", "time_q80_ms", "gbps", "roofline_h200_ms", "tflops"} <= metrics
    assert all(math.isfinite(float(r["value"])) for r in rows)
    assert all(r["device"] and r["versions"] and r["timestamp"] for r in rows)
    for op in OPS:
        assert f"| {op} |" in result["table"]


def test_results_consistent(tiny_run):
    _, result = tiny_run
    for r in result["results"]:
        assert 0 < r.q20_s <= r.median_s <= r.q80_s
        assert r.nbytes > 0 and r.roofline_s == roofline_seconds(r.flops, r.nbytes)
    flops = {r.op: r.flops for r in result["results"]}
    assert flops["linear_gelu_bwd"] == 2 * 32 * 32 * 128 and flops["bias_gelu"] == 0


def test_table_has_paired_ratio_column(tiny_run):
    """CPU providers are timed round-robin: each row carries eager/this as a ratio or "noisy", eager's own is 1."""
    _, result = tiny_run
    assert "eager/this" in result["table"].splitlines()[0]
    for r in result["results"]:
        assert r.vs_eager == "noisy" or (r.vs_eager.endswith("x") and float(r.vs_eager[:-1]) > 0), r
        if r.provider == "eager":
            assert r.vs_eager == "1.00x"


def test_plots_written(tiny_run):
    out, result = tiny_run
    assert {p.name for p in result["plots"]} == {f"{f}.png" for f in ("layer_norm", "gelu", "dropout_add", "ffn",
                                                                      "attention")}  # fmt: skip
    for p in result["plots"]:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_csv_appends(tmp_path):
    argv = [*TINY, "--ops", "gelu", "--out", str(tmp_path)]
    microbench.main(argv)
    first = len(_rows(tmp_path / "microbench.csv"))
    microbench.main(argv)
    assert len(_rows(tmp_path / "microbench.csv")) == 2 * first


def test_roofline_formula():
    assert roofline_seconds(0, 0) == pytest.approx(3e-6)
    assert roofline_seconds(788e12, 1) == pytest.approx(1.0 + 3e-6)
    assert roofline_seconds(1, 4.3e12) == pytest.approx(1.0 + 3e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ops", "softmax"], "unknown op softmax"),
        (["--min-time", "0"], "positive number"),
        (["--dtype", "int8"], "invalid choice"),
        (["--d-model", "30", "--heads", "4"], "must divide"),
    ],
)
def test_bad_flags_exit_with_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        microbench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
