"""margin-bench --regularizers: a head's Center / Ring terms benchmarked with the loss, checked against the
float64 truth with the same regularisers; bad combinations are usage errors."""
import json

import pytest
import torch

import margin_kernels as mk
from margin_kernels.bench import cli
from margin_kernels.bench.regularized import regularized_loss
from tests.helpers import random_problem
from tests.tolerances import FP32_GRAD, FP32_LOSS, FP64_SHORT_SUM


def test_sweep_with_regularizers_matches_the_float64_truth(tmp_path):
    out = tmp_path / "run.json"
    code = cli.main(["--loss", "arcface", "-B", "16", "-d", "16", "-C", "500", "--backends", "torch,cpu",
                     "--regularizers", "center,center-invariant,ring", "--repeats", "1", "--warmup", "0",
                     "--threads", "1", "--no-progress", "--no-floor", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    ran = [row for row in rows if row["status"] == "ok"]
    assert {row["method"] for row in ran} >= {"torch"}
    for row in ran:
        assert row["regularizers"] == "center,center-invariant,ring"
        assert row["loss_diff"] < FP32_LOSS * max(1.0, abs(row["loss_value"])), row
        assert row["dx_err"] < FP32_GRAD and row["dw_err"] < FP32_GRAD, row


def test_regularized_bench_call_is_the_heads_loss():
    """The bench's head-free composition equals MarginHead with the same regularisers (float64)."""
    x, w, y = random_problem(8, 40, 12)
    fn = regularized_loss(mk.ArcFace(), "center,ring", 40, 12, torch.float64, "cpu", backend="torch")
    head = mk.MarginHead(40, 12, mk.ArcFace(), dtype=torch.float64, backend="torch",
                         regularizers=[mk.CenterLoss(0.003), mk.RingLoss(0.01)])
    with torch.no_grad():
        head.weight.copy_(w)
    assert fn(x, w, y).item() == pytest.approx(head(x, y).item(), rel=FP64_SHORT_SUM)


def test_regularizers_with_peers_or_unknown_names_are_usage_errors(capsys):
    for argv in (["--regularizers", "nosuch"], ["--regularizers", "ring", "--peers", "naive-arcface"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + ["--no-progress"])
        assert exc.value.code == 2
    assert "--regularizers" in capsys.readouterr().err
