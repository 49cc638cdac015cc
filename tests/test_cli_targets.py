from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from edgeopt import estimate_latency
from edgeopt.cli import _parse_input_size, _parse_precisions, main
from edgeopt.hw_models import LatencyTable, list_targets


def test_targets_prints_one_line_per_target(capsys):
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(list_targets())
    by_name = {line.split()[0]: line for line in lines}
    assert {"pi4", "host", "jetson-orin-nano"} <= set(by_name)
    assert "ESTIMATED" in by_name["pi4"] and "Cortex-A72" in by_name["pi4"]
    assert "measured here with onnxruntime" in by_name["host"]
    assert "model:" in by_name["jetson-orin-nano"] and "N:M 2:4" in by_name["jetson-orin-nano"]
    assert all("Latency:" in line for line in lines)
    assert "dynamic-range int8 on linear layers" in by_name["host"]
    assert "dynamic-range int8 not run" in by_name["pi4"] and "dynamic-range int8 not run" in by_name["jetson-orin-nano"]


def test_a_search_without_budget_is_a_usage_error_and_no_arguments_print_usage(capsys):
    assert main(["--target", "pi4"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main([]) == 2
    assert "targets" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["profile", "--model", "no_such_net", "--out", "x.csv"], "Unknown model 'no_such_net'"),
    (["profile", "--model", "resnet18", "--out", "x.csv", "--input-size", "big"], "--input-size"),
    (["profile", "--model", "resnet18", "--out", "x.csv", "--precisions", "int3"], "--precisions"),
    (["profile", "--model", "resnet18", "--out", "x.csv", "--keep-ratios", "0.3"], "keep_ratio=0.3"),
    (["profile", "--model", "resnet18", "--out", "x.csv", "--threads", "0"], "at least 1"),
])
def test_user_errors_are_one_clean_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_argparse_usage_errors_return_two(capsys):
    assert main(["profile", "--out", "x.csv"]) == 2  # --model missing
    assert "--model" in capsys.readouterr().err


def test_input_size_and_precision_parsing():
    assert _parse_input_size("32") == (1, 3, 32, 32)
    assert _parse_input_size("1x28x28") == (1, 1, 28, 28)
    assert _parse_input_size("2x3x64x48") == (2, 3, 64, 48)
    assert _parse_precisions("fp32,int8,8/32,fp32") == [(32, 32), (8, 8), (8, 32)]


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "edgeopt.cli", "targets"], capture_output=True, text=True)
    assert out.returncode == 0 and "pi4" in out.stdout


@pytest.mark.slow
def test_profile_writes_a_table_that_lut_consumes(tmp_path, capsys):
    out = tmp_path / "squeeze.csv"
    code = main(["profile", "--model", "squeezenet1_1", "--num-classes", "10", "--input-size", "32",
                 "--out", str(out), "--keep-ratios", "1", "--precisions", "fp32", "--repeats", "3",
                 "--passes", "1", "--no-calibrate"])
    assert code == 0
    assert f"rows to {out}" in capsys.readouterr().out
    table = LatencyTable.from_csv(out)
    assert table.meta["model"] == "squeezenet1_1" and table.meta["input_shape"] == "1x3x32x32"
    model = torchvision.models.squeezenet1_1(num_classes=10).eval()
    estimate = estimate_latency(model, torch.randn(1, 3, 32, 32), target="host", lut=out)
    assert estimate.source == "lut"
    assert estimate.total_ms == pytest.approx(sum(l.ms for l in estimate.layers) + table.overhead_ms)
