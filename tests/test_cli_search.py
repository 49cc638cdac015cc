"""The `optimize` command as a user types it: bad input, interruption, crash and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from edgeopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, classes: int = 3, per_class: int = 24, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[:, :, c % 3] += 150  # each class has its own colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("data"))


def _base_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--target", "pi4", "--budget", "70%", "--model", "tests.cli_models:tiny", "--data", str(folder),
            "--trials", "4", "--finetune-top", "1", "--finetune-epochs", "0", "--out", str(out), "--quiet",
            *extra]


def _fails_cleanly(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err
    for word in words:
        assert word.lower() in err.lower(), (word, err)
    return err


@pytest.mark.parametrize("budget", ["1.2GMAC", "-3ms", "fast", "0%"])
def test_bad_budget(capsys, folder, tmp_path, budget):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("70%")] = budget
    _fails_cleanly(capsys, argv, "budget")


def test_unknown_target(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("pi4")] = "pi5"
    _fails_cleanly(capsys, argv, "pi5", "optimize targets")


def test_missing_and_empty_data_folder(capsys, tmp_path):
    _fails_cleanly(capsys, _base_args(tmp_path / "nope", tmp_path / "o1"), "nope")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, _base_args(tmp_path / "empty", tmp_path / "o2"), "empty")


def test_image_folder_with_one_class(capsys, tmp_path):
    one = _image_folder(tmp_path / "one", classes=1)
    _fails_cleanly(capsys, _base_args(one, tmp_path / "o"), "class")


def test_model_that_does_not_resolve(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("tests.cli_models:tiny")] = "no_such_module:factory"
    _fails_cleanly(capsys, argv, "no_such_module")


def test_weights_that_do_not_fit(capsys, folder, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    _fails_cleanly(capsys, _base_args(folder, tmp_path / "o", "--weights", str(weights)), "weights")


def test_untraceable_model_and_too_small_input(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path / "a")
    argv[argv.index("tests.cli_models:tiny")] = "tests.cli_models:Untraceable"
    _fails_cleanly(capsys, argv, "model")
    argv = _base_args(folder, tmp_path / "b", "--input-size", "8")
    argv[argv.index("tests.cli_models:tiny")] = "tests.cli_models:NeedsBigInput"
    _fails_cleanly(capsys, argv, "input")


def test_out_that_is_a_file(capsys, folder, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("something of the user's")
    _fails_cleanly(capsys, _base_args(folder, taken), "is a file", "folder")
    assert taken.read_text() == "something of the user's"


@pytest.mark.parametrize("trials", ["0", "-2"])
def test_no_trials(capsys, folder, tmp_path, trials):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("4")] = trials
    _fails_cleanly(capsys, argv, "--trials", "at least 1")


def test_model_with_nothing_to_compress(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("tests.cli_models:tiny")] = "tests.cli_models:NoLayers"
    _fails_cleanly(capsys, argv, "nothing to compress")


@pytest.mark.parametrize(("extra", "words"), [(["--normalize", "imagenett"], ["normalization"]),
                                              (["--mean", "0.5"], ["--mean and --std together"]),
                                              (["--mean", "a,b,c", "--std", "1,1,1"], ["--mean", "numbers"]),
                                              (["--mean", "0.5,0.5", "--std", "1,1"], ["channel"])])
def test_bad_normalization(capsys, folder, tmp_path, extra, words):
    _fails_cleanly(capsys, _base_args(folder, tmp_path, *extra), *words)


@pytest.mark.parametrize("text", ["not,a,table\n1,2,3\n", "\x00\x01garbage"])
def test_bad_latency_table(capsys, folder, tmp_path, text):
    lut = tmp_path / "lut.csv"
    lut.write_text(text)
    _fails_cleanly(capsys, _base_args(folder, tmp_path / "o", "--lut", str(lut)), "table")


def test_plan_json_with_unknown_layers_or_bad_values(capsys, folder, tmp_path):
    for i, plan in enumerate([{"version": 1, "layers": {"nope": {"w_bits": 8}}},
                              {"version": 1, "layers": {"stem.0": {"w_bits": 7}}}, "not json"]):
        path = tmp_path / f"plan{i}.json"
        path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
        _fails_cleanly(capsys, ["apply", "--model", "tests.cli_models:tiny", "--data", str(folder),
                                "--plan", str(path), "--out", str(tmp_path / f"m{i}.onnx")], "plan")


def test_a_warning_is_one_line_without_our_source_location(capsys, folder, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "layers": {}}))
    code = main(["apply", "--model", "squeezenet1_1", "--data", str(folder), "--input-size", "32",
                 "--plan", str(plan), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "m.onnx").is_file()
    warning = [line for line in err.splitlines() if "random weights" in line]
    assert warning == [line for line in err.splitlines() if line.strip()], err
    assert warning[0].startswith("optimize apply: warning: --model squeezenet1_1 has random weights")
    assert "cli.py" not in err and "UserWarning" not in err


@pytest.mark.slow
def test_budget_no_candidate_meets_exits_nonzero_and_keeps_outputs(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path)
    argv[argv.index("70%")] = "1KMACs"
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 3 and "closest" in err.lower() and "Traceback" not in err
    assert (tmp_path / "report.md").exists() and (tmp_path / "trials.csv").exists()


@pytest.mark.slow
def test_preprocessing_is_printed_recorded_and_exported_and_a_study_keeps_its_setup(capsys, folder, tmp_path):
    argv = _base_args(folder, tmp_path, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
    argv.remove("--quiet")
    assert main(argv) in (0, 3)
    first = capsys.readouterr().err.splitlines()[0]
    assert "of its MACs compressible" in first and "mean (0.500, 0.500, 0.500), std (0.250, 0.250, 0.250) from given values" in first
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and summary["preprocessing"]["input_size"] == [16, 16]
    import onnxruntime as ort

    meta = ort.InferenceSession(str(tmp_path / "selected" / "model.onnx"),
                                providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["edgeopt.preprocessing"]) == summary["preprocessing"]
    assert "from given values" in (tmp_path / "report.md").read_text()
    # The same folder for another target: refused with what differs, nothing mixed or lost.
    again = _base_args(folder, tmp_path, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
    again[again.index("pi4")] = "host"
    _fails_cleanly(capsys, again, "made for another search", "target", "--out")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def _command(folder: Path, out: Path, trials: int) -> list[str]:
    # From the hand plans only: these runs are about stopping and resuming trials, and the
    # allocation before the first trial would only delay the moment they are stopped.
    args = _base_args(folder, out, "--start", "hand")
    args[args.index("--trials") + 1] = str(trials)
    return [sys.executable, "-m", "edgeopt.cli", *args]


def _completed(out: Path) -> list[optuna.trial.FrozenTrial]:
    from optuna.storages.journal import JournalFileBackend

    if not (out / "study.journal").exists():
        return []
    try:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
        study = optuna.load_study(study_name="edgeopt", storage=storage)
    except Exception:
        return []
    return [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if "plan" in t.user_attrs]


def _wait_for(out: Path, count: int, proc: subprocess.Popen, limit_s: float = 300) -> None:
    start = time.monotonic()
    while len(_completed(out)) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() - start < limit_s
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_trials(folder, tmp_path):
    out = tmp_path / "run"
    # Enough trials that the kill lands mid-run: with 10, a quiet machine finished them all between
    # two looks at the journal.
    trials = 24
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_command(folder, out, trials), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.user_attrs["plan_key"] for t in _completed(out)}
    assert 3 <= len(before) < trials
    done = subprocess.run(_command(folder, out, trials), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _completed(out)
    keys = [t.user_attrs["plan_key"] for t in after]
    assert len(after) == trials and len(set(keys)) == trials
    assert before <= set(keys)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(folder, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_command(folder, out, 30), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "same command" in err
    assert len(_completed(out)) >= 2


@pytest.mark.parametrize("extra", [["--screen", "-1"], ["--screen-epochs", "-0.5"]])
def test_bad_screening(capsys, folder, tmp_path, extra):
    _fails_cleanly(capsys, _base_args(folder, tmp_path, *extra), "screen")


@pytest.mark.parametrize(("scales", "words"), [("0.3", ["input-scales", "0.3"]), ("0.75", ["input-scales", "1.0"]),
                                               ("big", ["input-scales", "numbers"])])
def test_bad_input_scales(capsys, folder, tmp_path, scales, words):
    _fails_cleanly(capsys, _base_args(folder, tmp_path, "--input-scales", scales), *words)
