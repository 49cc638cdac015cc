"""The deployment bundle: run.py on the host's onnxruntime against the PyTorch model, its refusals,
its camera path, what it may import, and the README and report notes on which runtime the
target's latency is for."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from edgeopt import SearchSpace, apply_plan, export_onnx
from edgeopt.deploy import runner_source, write_bundle
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.evaluators.onnx_export import PREPROCESSING_KEY
from edgeopt.hw_models.targets import get_target
from edgeopt.search import data
from edgeopt.search.report import write_report
from tests.deploy.bundle import make_bundle, preprocessing, read_results, reference_inputs, write_images

# Runs a script with torch and edgeopt made unimportable: what the bundle's run.py meets on a Pi.
WITHOUT_TORCH = ("import runpy, sys\n"
                 "for name in ('torch', 'torchvision', 'edgeopt'):\n"
                 "    sys.modules[name] = None\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _run(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(script), *args], capture_output=True,
                          text=True, cwd=script.parent, env=env, timeout=120)


def _int8_bundle(tiny, tmp_path: Path, *, size: int = 16, images: int = 4):
    """TinyNet, uniform int8, exported with the preprocessing of 40x34 photos loaded at `size`."""
    torch.set_num_threads(1)
    prep = preprocessing(size, classes=10)
    photos = write_images(tmp_path / "photos", images)
    x = reference_inputs(photos, prep)
    example = x[:1]
    small = apply_plan(tiny, SearchSpace.from_model(tiny, example).uniform(w_bits=8, a_bits=8), example,
                       calib_data=[x, torch.randn(16, 3, size, size)], reduce_range=int8_needs_reduce_range())
    path = export_onnx(small, example, tmp_path / "selected" / "model.onnx", preprocessing=prep)
    return small, x, make_bundle(tmp_path / "selected", path, prep), tmp_path / "photos"


def test_run_py_gives_the_pytorch_models_top1_without_torch(tiny, tmp_path):
    small, x, run_py, photos = _int8_bundle(tiny, tmp_path)
    done = _run(run_py, str(photos), "--threads", "1", "--warmup", "2", "--runs", "3", "--top-k", "3",
                "--json", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        ref = small(x).numpy()
    scores, top1 = read_results(tmp_path / "out.json")
    # The photos were resized (40x34 -> 16x16) and normalized by run.py from the metadata alone;
    # the inputs are edgeopt's to the last bit, so an integer model's scores agree to float rounding.
    assert top1 == ref.argmax(1).tolist()
    np.testing.assert_allclose(scores, ref, atol=1e-5 * np.abs(ref).max())
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["threads"] == 1 and out["warmup"] == 2
    assert all(len(r["latency_ms_runs"]) == 3 and len(r["top"]) == 3 for r in out["images"])
    lines = done.stdout.strip().splitlines()
    assert "1 thread(s)" in lines[0] and "2 warm-up run(s), median of 3 run(s)" in lines[0]
    assert lines[1].startswith("img_00.png: ") and " ms  1. class_" in lines[1]
    assert lines[-1].startswith("latency: median ") and "over 4 image(s) x 3 run(s), 1 thread(s)" in lines[-1]


def test_run_py_feeds_a_model_searched_at_a_smaller_input_as_pytorch_does(tiny, tmp_path):
    """A plan at input scale 0.625 of data loaded at 32x32: the ONNX takes 20x20; run.py loads the
    photos as edgeopt did (40x34 -> 32x32) and resizes them once more as the PyTorch model does."""
    torch.set_num_threads(1)
    prep = preprocessing(32, classes=10)
    photos = write_images(tmp_path / "photos", 4)
    x = reference_inputs(photos, prep)
    space = SearchSpace.from_model(tiny, x[:1])
    small = apply_plan(tiny, space.uniform(keep_ratio=0.75, input_scale=0.625), x[:1], space=space,
                       calib_data=[x])
    path = export_onnx(small, x[:1], tmp_path / "selected" / "model.onnx", preprocessing=prep)
    run_py = make_bundle(tmp_path / "selected", path, json.loads(
        _metadata(path)[PREPROCESSING_KEY]))
    done = _run(run_py, str(tmp_path / "photos"), "--threads", "1", "--runs", "1", "--json", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        ref = small(x).numpy()  # full-size inputs: the model resizes them itself
    scores, top1 = read_results(tmp_path / "out.json")
    assert top1 == ref.argmax(1).tolist()
    np.testing.assert_allclose(scores, ref, atol=1e-4 * np.abs(ref).max())
    assert json.loads((tmp_path / "out.json").read_text())["preprocessing"]["input_size"] == [20, 20]


def _metadata(path: Path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_run_py_refuses_bad_input_with_one_clear_message(tiny, tmp_path):
    _, _, run_py, photos = _int8_bundle(tiny, tmp_path, images=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_text("not an image")
    plain = export_onnx(tiny, torch.randn(1, 3, 16, 16), tmp_path / "plain.onnx")  # no preprocessing metadata
    cases = [
        ((str(tmp_path / "no_such_folder"),), "no_such_folder: no such file or folder"),
        ((str(tmp_path / "empty"),), "holds no images"),
        ((str(tmp_path / "broken.png"),), "Cannot read the image"),
        ((str(photos), "--model", str(plain)), f"carries no {PREPROCESSING_KEY} metadata"),
        ((str(photos), "--model", str(tmp_path / "missing.onnx")), "no such model file"),
        ((), "Give image files or folders of images, or --camera"),
        ((str(photos), "--runs", "0"), "at least 1"),
    ]
    for args, message in cases:
        done = _run(run_py, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        err = done.stderr.strip()
        assert err.startswith("run.py: error: ") and message in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert done.stdout == ""


def test_camera_takes_one_frame_with_the_first_tool_installed(tiny, tmp_path):
    _, _, run_py, photos = _int8_bundle(tiny, tmp_path, images=1)
    frame = photos / "img_00.png"
    tools = tmp_path / "bin"
    tools.mkdir()
    # A stand-in for the Pi camera's tool: it "captures" a known picture to the -o path.
    fake = tools / "rpicam-still"
    fake.write_text(f'#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n{shutil.which("cp")} "{frame}" "$2"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": str(tools)}
    done = _run(run_py, "--camera", str(frame), "--runs", "1", "--warmup", "0", "--json",
                str(tmp_path / "cam.json"), env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "cam.json").read_text())
    assert [Path(r["image"]).name for r in out["images"]] == ["img_00.png", "camera.jpg"]
    assert out["images"][0]["scores"] == out["images"][1]["scores"]  # the same picture, the same scores
    (tools / "rpicam-still").unlink()
    done = _run(run_py, "--camera", env=env)
    assert done.returncode == 1 and "found no camera tool" in done.stderr and "rpicam-still" in done.stderr


def test_run_py_imports_only_onnxruntime_numpy_pillow_and_the_standard_library():
    tree = ast.parse(runner_source().read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - set(sys.stdlib_module_names) == {"onnxruntime", "numpy", "PIL"}


def test_run_py_reads_what_edgeopts_data_loading_records():
    spec = importlib.util.spec_from_file_location("bundle_run", runner_source())
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.PREPROCESSING_KEY == PREPROCESSING_KEY
    assert data._CROP_RESIZE.format(size=32).startswith(run.CROP_RESIZE)
    assert data._WHOLE_RESIZE.format(size=32).startswith(run.WHOLE_RESIZE)
    assert run.IMAGE_EXTENSIONS == data.IMAGE_EXTENSIONS
    assert run.DEFAULT_THREADS == get_target("pi4").threads


def test_bundle_readme_for_the_pi_says_install_threads_runtime_and_profiling(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    prep = preprocessing(32, classes=10)
    written = write_bundle(tmp_path, target=get_target("pi4"), model="torchvision resnet18 (11,181,642 params)",
                           preprocessing=prep, preprocessing_text="32x32 RGB (shorter side...)",
                           latency="2.50 ms (lut)", budgets=("50%", "4MB"))
    assert [p.name for p in written] == ["run.py", "README.md"]
    assert (tmp_path / "run.py").read_text() == runner_source().read_text()
    assert os.access(tmp_path / "run.py", os.X_OK)
    text = (tmp_path / "README.md").read_text()
    assert "pip install onnxruntime numpy pillow" in text and "64-bit Raspberry Pi OS" in text
    assert "--threads 4" in text and "2.50 ms (lut), for ncnn" in text and "4 threads" in text
    assert "ncnn" in text and "no SDOT/UDOT" in text and "runs onnxruntime" in text
    assert "optimize profile --model resnet18 --input-size 32 --num-classes 10 --threads 4 --out pi4-onnxruntime.csv" in text
    assert "optimize --target pi4 --lut pi4-onnxruntime.csv --budget 50% --budget 4MB" in text
    assert "classes: 10: class_0, class_1" in text
    # Not a torchvision model: the profiler cannot build it, and the README says what to give instead.
    write_bundle(tmp_path, target=get_target("host"), model="edgenet v2 (40,000 params)", preprocessing=prep,
                 preprocessing_text="", latency="1.00 ms (measured)")
    text = (tmp_path / "README.md").read_text()
    assert "--model ARCH" in text and "not one" in text
    assert "ncnn" not in text and "the runtime this bundle runs" in text


def test_each_target_says_which_runtime_its_latency_is_for(tmp_path):
    pi4, host = get_target("pi4"), get_target("host")
    assert "ncnn" in pi4.runtime and host.runtime == "onnxruntime" and host.deploy_note() is None
    note = pi4.deploy_note()
    assert "ncnn" in note and "runs onnxruntime" in note and "Cortex-A72" in note and "optimize profile" in note
    # A table measured with onnxruntime on the Pi (what `optimize profile` writes) is for the
    # bundle's runtime: nothing left to warn about.
    table = tmp_path / "pi4-onnxruntime.csv"
    table.write_text("# runtime: onnxruntime 1.32.0 CPUExecutionProvider\n# threads: 4\n"
                     "op_kind,in_channels,out_channels,kernel_h,kernel_w,stride_h,stride_w,groups,input_h,input_w,"
                     "w_bits,a_bits,nm,latency_ms\nconv,3,16,3,3,1,1,1,32,32,32,32,,0.05\n")
    profiled = pi4.with_lut(table)
    assert profiled.runtime.startswith("onnxruntime") and profiled.deploy_note() is None


def test_report_says_which_runtime_the_latency_is_for_and_what_selected_holds(tmp_path):
    row = {"accuracy": 70.0, "macs": 2e6, "bytes": 4e5, "latency_ms": 3.0, "latency_source": "lut",
           "host_ms": 1.0, "host_spread_ms": 0.01}
    summary = {"model": "m", "data": "d", "target": "pi4: a Pi", "target_is_here": False, "budgets": ["50%"],
               "binds": True, "trials": 4, "sampler": "tpe", "seed": 0, "finetuned": 1, "max_drop": 1.0,
               "min_speedup": 1.1, "proxy_spread": 10.0, "base": row | {"latency_ms": 5.0},
               "selected": row | {"trial": 3}, "deploy_note": get_target("pi4").deploy_note()}
    write_report(tmp_path / "report.md", summary=summary)
    text = (tmp_path / "report.md").read_text()
    assert get_target("pi4").deploy_note() in text and "selected/ is the bundle for the device" in text
    write_report(tmp_path / "report.md", summary=summary | {"deploy_note": None, "selected": None})
    text = (tmp_path / "report.md").read_text()
    assert "ncnn" not in text and "selected/ is the bundle" not in text
