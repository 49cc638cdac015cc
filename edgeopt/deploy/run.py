#!/usr/bin/env python3
"""Classify images or a camera frame with the exported model, on the device.

The deployment bundle's runner: it needs onnxruntime, numpy and Pillow and nothing else (no torch,
no edgeopt), so it runs on a Raspberry Pi as it is:

    pip install onnxruntime numpy pillow
    python3 run.py photos/                      # every image in a folder (and its subfolders)
    python3 run.py cat.jpg dog.png --top-k 3
    python3 run.py --camera                     # one frame from the camera
    python3 run.py photos/ --threads 4 --warmup 10 --runs 50 --json results.json

How an image becomes the model's input (size, colour, resize, scaling, mean, std, class names) is
read from the model's own metadata (key `edgeopt.preprocessing`), which edgeopt wrote when it
exported the model from the data it was trained and searched on: the images here are prepared
the way the training images were. Latency is measured per image: a warm-up first (onnxruntime
allocates and picks kernels on its first runs), then the median of --runs timed runs, with a
fixed --threads, since the figure means nothing without the thread count it was taken with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREPROCESSING_KEY = "edgeopt.preprocessing"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The `resize` texts edgeopt's data loading records (edgeopt/search/data.py); a test checks that
# these prefixes still match what it writes.
CROP_RESIZE = "shorter side resized to"
WHOLE_RESIZE = "whole image resized to"
DEFAULT_THREADS = 4  # a Raspberry Pi 4 has 4 cores; the pi4 target's latency is for 4 threads
# Tried in order by --camera: the Pi camera's tool on current Raspberry Pi OS, its older name,
# and fswebcam for USB cameras. Each writes one JPEG frame to {out}.
CAMERA_COMMANDS = (
    ("rpicam-still", ["rpicam-still", "-n", "-t", "1000", "--width", "640", "--height", "480", "-o", "{out}"]),
    ("libcamera-still", ["libcamera-still", "-n", "-t", "1000", "--width", "640", "--height", "480", "-o", "{out}"]),
    ("fswebcam", ["fswebcam", "-q", "--no-banner", "-r", "640x480", "{out}"]),
)


# onnxruntime fuses a DequantizeLinear of int4 or int8 weights into the MatMul it feeds
# (MatMulNBits) and by default computes that MatMul on its float input quantized to int8 on the fly
# ("accuracy level" 4). A weight-only quantized Linear layer on tokens (a transformer's) then gives
# other scores than the model edgeopt evaluated: a torchvision ViT's moved by 0.05-0.2 on scores
# up to 30, where float rounding moves them by 1e-5. Level 1 keeps that input in float32, as the
# model was evaluated. Layers with 8-bit activations are not affected (they are integer layers).
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def session_options(ort, threads: int):
    """The onnxruntime session options edgeopt measures and runs its models with (`ort`: the
    onnxruntime module): a fixed thread count, one graph run at a time, every graph optimization
    (onnxruntime's default, stated so the measuring sessions cannot drift from it), and
    SESSION_CONFIG."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # An explicit count: onnxruntime's default sizes its pool from the cores it sees and pins its
    # threads, so latency would depend on what else runs; a fixed count makes figures comparable.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # its notes on unused initializers are not for the user
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


class BundleError(Exception):
    """Input this script cannot use; the message says what to do. Printed without a traceback."""


def load_session(model: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("onnxruntime is not installed: pip install onnxruntime numpy pillow") from None
    if not model.is_file():
        raise BundleError(f"{model}: no such model file; run.py expects model.onnx beside it, or pass --model.")
    try:
        session = ort.InferenceSession(str(model), session_options(ort, threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types for a bad file
        raise BundleError(f"onnxruntime cannot load {model}: {str(exc).strip().splitlines()[0][:300]}") from None
    return session, ort.__version__


def read_preprocessing(session, model: Path) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if PREPROCESSING_KEY not in meta:
        raise BundleError(f"{model} carries no {PREPROCESSING_KEY} metadata, so how to prepare an image for it is "
                          "unknown; use the model.onnx that edgeopt wrote into selected/ (export_onnx(..., "
                          "preprocessing=data.preprocessing) from Python).")
    prep = json.loads(meta[PREPROCESSING_KEY])
    missing = [k for k in ("input_size", "mean", "std") if k not in prep]
    if missing:
        raise BundleError(f"{model}: the {PREPROCESSING_KEY} metadata lacks {', '.join(missing)}.")
    return prep


def image_files(paths: list[str]) -> list[Path]:
    """The images named, folders expanded (sorted, hidden files and folders skipped)."""
    files: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if not path.exists():
            raise BundleError(f"{text}: no such file or folder. Give image files or folders of images "
                              f"({', '.join(IMAGE_EXTENSIONS)}), or --camera.")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise BundleError(f"{text} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            files += found
        else:
            files.append(path)
    return files


def capture_frame(folder: Path) -> Path:
    """One camera frame as a JPEG file, taken with the first camera tool installed."""
    out = folder / "camera.jpg"
    for tool, command in CAMERA_COMMANDS:
        if shutil.which(tool) is None:
            continue
        done = subprocess.run([part.replace("{out}", str(out)) for part in command], capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise BundleError(f"{tool} could not take a picture ({why}); check that the camera is connected "
                              f"and enabled (`{tool}` alone should save a picture).")
        return out
    raise BundleError("--camera found no camera tool: on Raspberry Pi OS the camera module's is rpicam-still "
                      "(sudo apt install rpicam-apps); for a USB camera install fswebcam (sudo apt install "
                      "fswebcam). Or save a picture and pass its file.")


class Preprocess:
    """An image file -> the model's input, as edgeopt's data loading made the training inputs:
    decode, grey or RGB, resize, pixel / 255, then (x - mean) / std per channel, NCHW float32."""

    def __init__(self, prep: dict) -> None:
        import numpy as np

        self.np = np
        # The size the data's images were prepared at; a model searched at a smaller input scale
        # takes `input_size` and is fed those images resized once more (`input_resize`).
        self.height, self.width = (int(v) for v in prep.get("data_size", prep["input_size"]))
        self.model_height, self.model_width = (int(v) for v in prep["input_size"])
        self.channels = int(prep.get("channels", len(prep["mean"])))
        self.resize = str(prep.get("resize", ""))
        self.mean = np.asarray(prep["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(prep["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.notes: list[str] = []

    def __call__(self, path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise BundleError(f"Cannot read the image {path} ({exc}).") from None
        image = self._resize(image, path)
        pixels = self.np.asarray(image, dtype=self.np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        # float32 throughout, as the training tensors were: the same inputs to the last bit.
        x = pixels.astype(self.np.float32) / self.np.float32(255.0)
        if (self.model_height, self.model_width) != (self.height, self.width):
            x = self._to_model_size(x)
        return ((x - self.mean) / self.std)[None].astype(self.np.float32)

    def _to_model_size(self, x):
        return resize_float(x, (self.model_height, self.model_width))

    def _resize(self, image, path: Path):
        from PIL import Image

        size = (self.width, self.height)
        if self.resize.startswith(WHOLE_RESIZE):
            return image if image.size == size else image.resize(size, Image.BILINEAR)
        if not self.resize.startswith(CROP_RESIZE) and image.size != size:
            # The training images were used at their stored size; a frame of another size is
            # brought to it the way edgeopt resizes folders, keeping the aspect ratio.
            self.notes.append(f"{path.name} is {image.size[0]}x{image.size[1]}, the model takes {size[0]}x{size[1]}: "
                              "shorter side resized, then center crop")
        elif image.size == size:
            return image
        # Shorter side to the model's size (bilinear), then a center crop: edgeopt's folder loading.
        w, h = image.size
        scale = max(self.width, self.height) / min(w, h)
        new_w, new_h = max(self.width, round(w * scale)), max(self.height, round(h * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - self.width) // 2, (new_h - self.height) // 2
        return image.crop((left, top, left + self.width, top + self.height))


def resize_float(x, size):
    """A float image (C, H, W) resized to `size` (H, W): antialiased bilinear, channel by channel,
    what the PyTorch model does to a full-size input (torch's antialiased bilinear follows PIL's)."""
    import numpy as np
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c in x]).astype(np.float32)


def softmax(scores):
    import numpy as np

    e = np.exp(scores - scores.max())
    return e / e.sum()


def run(args: argparse.Namespace) -> dict:
    model = Path(args.model).expanduser()
    if args.threads < 1 or args.runs < 1 or args.warmup < 0 or args.top_k < 1:
        raise BundleError("--threads, --runs and --top-k must be at least 1, --warmup at least 0.")
    if not args.images and not args.camera:
        raise BundleError("Give image files or folders of images, or --camera.")
    files = image_files(args.images)  # before loading the model: a typo fails at once
    session, version = load_session(model, args.threads)
    prep = read_preprocessing(session, model)
    preprocess = Preprocess(prep)
    names = list(prep.get("class_names") or [])
    input_name = session.get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        if args.camera:
            files.append(capture_frame(Path(tmp)))
        inputs = [(path, preprocess(path)) for path in files]
    for note in dict.fromkeys(preprocess.notes):
        print(f"note: {note}", file=sys.stderr)
    for _ in range(args.warmup):
        session.run(None, {input_name: inputs[0][1]})
    results = []
    for path, x in inputs:
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            scores = session.run(None, {input_name: x})[0][0]
            times.append((time.perf_counter() - started) * 1e3)
        probs = softmax(scores.astype("float64"))
        top = probs.argsort()[::-1][:args.top_k]
        results.append({
            "image": str(path), "latency_ms": statistics.median(times), "latency_ms_runs": times,
            "top": [{"index": int(i), "class": names[i] if i < len(names) else str(int(i)),
                     "probability": float(probs[i])} for i in top],
            "scores": [float(v) for v in scores],
        })
    all_times = [t for r in results for t in r["latency_ms_runs"]]
    return {"model": str(model), "onnxruntime": version, "threads": args.threads, "warmup": args.warmup,
            "runs": args.runs, "preprocessing": prep, "images": results,
            "latency_ms_median": statistics.median(all_times)}


def report(out: dict) -> None:
    h, w = out["preprocessing"]["input_size"]
    print(f"{out['model']}: {h}x{w} input, onnxruntime {out['onnxruntime']}, {out['threads']} thread(s), "
          f"{out['warmup']} warm-up run(s), median of {out['runs']} run(s) per image")
    for r in out["images"]:
        top = "  ".join(f"{k + 1}. {t['class']} {t['probability']:.3f}" for k, t in enumerate(r["top"]))
        print(f"{Path(r['image']).name}: {r['latency_ms']:.2f} ms  {top}")
    times = sorted(t for r in out["images"] for t in r["latency_ms_runs"])
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    print(f"latency: median {out['latency_ms_median']:.2f} ms per image (90th percentile {p90:.2f} ms) over "
          f"{len(out['images'])} image(s) x {out['runs']} run(s), {out['threads']} thread(s)")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(prog="run.py", description="Classify images or a camera frame with the "
                                     "exported model and measure its latency (onnxruntime, numpy, Pillow).")
    parser.add_argument("images", nargs="*", help="image files or folders of images")
    parser.add_argument("--camera", action="store_true",
                        help="also classify one camera frame (rpicam-still, libcamera-still or fswebcam)")
    parser.add_argument("--model", default=str(here / "model.onnx"), help="default: model.onnx beside run.py")
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"onnxruntime intra-op threads (default {DEFAULT_THREADS}, the Pi 4's cores)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before timing (default 10)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per image; the median is printed (default 20)")
    parser.add_argument("--json", default=None, help="also write every result (all scores, all timings) to this file")
    args = parser.parse_args(argv)
    try:
        out = run(args)
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(out, indent=1))
            except OSError as exc:
                raise BundleError(f"Cannot write {args.json}: {exc.strerror or exc}.") from None
    except BundleError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1
    report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
