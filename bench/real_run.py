"""What a run on a user's real model costs (issue 22, point 3): every phase of `optimize`, timed.

    python bench/real_run.py --arch mobilenet_v2 --size 224 --workers 1
    python bench/real_run.py --arch mobilenet_v2 --size 32 --workers 1     # how each phase grows
    python bench/real_run.py --arch mobilenet_v2 --size 224 --workers 2    # ... and with a second worker
    python bench/real_run.py ... --start hand    # without the allocation's sensitivity table and timings

The model is torchvision's, with random weights (only time matters here); the data is an
ImageFolder of --images training images (an equal share per class) and 500 validation images taken
from ../shared/data/cifar10-full.tar.gz (unpacked once into --cache) and resized by edgeopt's loader
to --size, as `optimize --data DIR --input-size N` would. The run is `optimize` itself on --target
host; each phase is timed by wrapping the function that does it (nothing in edgeopt changes):

- load: decoding and resizing the images;   - inventory: SearchSpace.from_model;
- sensitivity: the per-change table the allocation needs;   - allocation: timing each single change;
- search: all trials (and the median trial, from the study);   - screening; - fine-tuning (and per epoch);
- export: ONNX files written;   - host timing: whole-model onnxruntime measurements after the search.

Results are added to bench/results/real_run.json under "<arch>-<size>-w<workers>", with the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.compare import _cpu_name, study_trial_seconds  # noqa: E402
from bench.prove_base import ARCHIVE, DEFAULT_CACHE, commit, machine  # noqa: E402

RESULTS = ROOT / "results" / "real_run.json"


def subset_folder(cache: Path, images: int, val_per_class: int = 50) -> Path:
    """An ImageFolder of `images` training images (equal per class) and `val_per_class`
    validation images per class, as links into the unpacked CIFAR-10 set."""
    full = cache / "cifar10-full"
    if not full.is_dir():
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(cache, filter="data")
    out = cache / (f"cifar10-{images}" if val_per_class == 50 else f"cifar10-{images}-val{val_per_class}")
    if out.is_dir():
        return out
    classes = sorted(p.name for p in (full / "train").iterdir())
    for split, per_class in (("train", images // len(classes)), ("val", val_per_class)):
        for name in classes:
            target = out / split / name
            target.mkdir(parents=True, exist_ok=True)
            for file in sorted((full / split / name).iterdir())[:per_class]:
                (target / file.name).symlink_to(file)
    return out


class Phases:
    """Wall time spent inside each wrapped function (outermost calls only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, module, attr: str, phase: str) -> None:
        inner = getattr(module, attr)

        def timed(*args, **kwargs):
            self._depth[phase] = self._depth.get(phase, 0) + 1
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth[phase] -= 1
                if self._depth[phase] == 0:
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
                    self.calls[phase] = self.calls.get(phase, 0) + 1

        setattr(module, attr, timed)


@contextmanager
def timing(phases: Phases, name: str):
    start = time.perf_counter()
    yield
    phases.seconds[name] = phases.seconds.get(name, 0.0) + time.perf_counter() - start
    phases.calls[name] = phases.calls.get(name, 0) + 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mobilenet_v2", help="a torchvision architecture (default mobilenet_v2)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=3000, help="training images (default 3000)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--screen", type=int, default=4)
    p.add_argument("--budget", default="60%", help="as optimize --budget reads it (default 60%% of the MACs)")
    p.add_argument("--start", default="allocated", choices=("allocated", "hand", "none"),
                   help="as optimize --start (hand: no sensitivity table, no allocation)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import optuna
    import torchvision

    import edgeopt.search.optimize as optimize_module
    import edgeopt.search.finetune as finetune_module
    import edgeopt.spaces.space as space_module
    from edgeopt.search.data import load_data
    from edgeopt.search.finetune import FinetuneConfig
    from edgeopt.search.optimize import SearchConfig, optimize

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    phases = Phases()
    phases.wrap(space_module.SearchSpace, "from_model", "inventory")
    phases.wrap(optimize_module, "measure_sensitivity", "sensitivity")
    phases.wrap(optimize_module, "allocate", "allocation")
    phases.wrap(optimize_module, "run_search", "search")
    phases.wrap(optimize_module, "screen", "screening")
    phases.wrap(optimize_module, "finetune", "finetuning")
    phases.wrap(finetune_module, "train", "training (inside screening and fine-tuning)")
    phases.wrap(optimize_module, "export_onnx", "export")
    phases.wrap(optimize_module, "_measured_here", "host timing of the finalists")
    phases.wrap(optimize_module, "_host_latency", "host timing of base and selected")

    folder = subset_folder(args.cache, args.images)
    with timing(phases, "load"):
        data = load_data(str(folder), input_size=args.size, progress=False)
    model = getattr(torchvision.models, args.arch)(num_classes=data.num_classes).eval()
    key = f"{args.arch}-{args.size}-w{args.workers}" + ("" if args.start == "allocated" else f"-{args.start}")
    out = args.cache / "real_run" / key
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a fresh run: a resumed one would skip the phases it measures
    started = time.perf_counter()
    config = FinetuneConfig(top=args.top, epochs=args.finetune_epochs, screen=args.screen)
    result = optimize(model, data, target="host", budget=args.budget, out=out, workers=args.workers, progress=True,
                      search=SearchConfig(trials=args.trials, seed=0, start=args.start), finetune_config=config)
    total = time.perf_counter() - started
    trials = study_trial_seconds(out)
    tuned_epochs = args.top * args.finetune_epochs
    entry = {
        "arch": args.arch, "size": args.size, "workers": args.workers, "images": {
            "train": len(data.train), "proxy": len(data.proxy), "val": len(data.val)},
        "settings": {"trials": args.trials, "finetune_epochs": args.finetune_epochs, "top": args.top,
                     "screen": args.screen, "screen_epochs": config.screen_length, "budget": args.budget,
                     "start": args.start},
        "phases_s": {k: round(v, 1) for k, v in phases.seconds.items()},
        "calls": phases.calls, "trial_s": trials, "total_optimize_s": round(total, 1),
        "finetune_s_per_epoch": round(phases.seconds.get("finetuning", 0.0) / tuned_epochs, 1) if tuned_epochs else None,
        "met_budget": result.met_budget,
        "machine": machine() | {"cpu_name": _cpu_name(), "python": platform.python_version()}, "commit": commit(),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
