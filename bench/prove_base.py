"""Train the base models of bench/prove.py (issue 18) on the full CIFAR-10 training set.

    python bench/prove_base.py --model resnet20 --threads 1 &   # both at once, one core each:
    python bench/prove_base.py --model edgenet --threads 1 &    # faster in all than one after the other

Data: ../shared/data/cifar10-full.tar.gz, unpacked once into --cache (outside the repository), split
by edgeopt's loader as `optimize --data` splits it (seed 0): 48,000 train / 2,000 proxy held out of
train / the 5,000 given val images, which only measure the result. Training is edgeopt's own loop
(edgeopt.search.training.train: AdamW, warm-up, cosine) with a checkpoint per epoch in --cache, so
a killed run resumes where it stopped (`--threads` may differ between sittings; the recipe may not).

Writes bench/results/models/<model>.pt (the state dict, with its recipe and validation top-1) and
its entry in bench/results/models/base.json (command, seconds, machine, CPU flags, commit).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO))  # `bench.cifar_resnet`, whether run as a script or with -m

from bench.cifar_resnet import resnet20  # noqa: E402
from edgeopt.evaluators.cpu import cpu_flags  # noqa: E402
from edgeopt.search.data import DataBundle, load_data  # noqa: E402
from edgeopt.search.models import EdgeNet  # noqa: E402
from edgeopt.search.training import evaluate, random_affine, train  # noqa: E402

MODELS_DIR = ROOT / "results" / "models"
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-full.tar.gz"
DEFAULT_CACHE = Path.home() / ".cache" / "edgeopt-bench"
EDGENET_WIDTH = 64
# One recipe for both models. Epochs fit the budget of two hours of this machine for the
# two trainings together (measured: one epoch of 48,000 images on one core takes about 340 s for
# ResNet-20 and 410 s for the edgenet at width 64).
RECIPE = {"resnet20": {"epochs": 15, "lr": 0.005, "weight_decay": 0.05, "batch_size": 128},
          "edgenet": {"epochs": 18, "lr": 0.005, "weight_decay": 0.05, "batch_size": 128}}


def cifar_data(cache: Path) -> DataBundle:
    """The full CIFAR-10 set as edgeopt's loader splits it, unpacked into `cache` on first use."""
    folder = cache / "cifar10-full"
    if not (folder / "train").is_dir() or not (folder / "val").is_dir():
        if not ARCHIVE.is_file():
            sys.exit(f"{ARCHIVE} is missing; this benchmark needs the shared CIFAR-10 archive.")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(cache, filter="data")
    return load_data(str(folder), seed=0)


def build(name: str, data: DataBundle) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet20":
        return resnet20(data.num_classes)
    return EdgeNet(data.input_shape[0], data.num_classes, width=EDGENET_WIDTH)


def cifar_augment(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flips (CIFAR's classes are mirror-symmetric, unlike digits) and random_affine's
    small shifts, zooms and rotations."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return random_affine(x, degrees=8.0, scale=0.1, pixels=3.0)


def machine() -> dict:
    flags = cpu_flags()
    return {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "avx512": "avx512f" in flags,
            "avx2": "avx2" in flags, "torch": torch.__version__}


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "edgeopt", "bench/prove_base.py", "bench/cifar_resnet.py")
    return git("rev-parse", "--short", "HEAD") + (" (dirty)" if dirty else "")


def load_base(name: str) -> torch.nn.Module:
    """A trained base model from bench/results/models, in eval mode."""
    saved = torch.load(MODELS_DIR / f"{name}.pt", map_location="cpu", weights_only=True)
    model = resnet20(10) if name == "resnet20" else EdgeNet(3, 10, width=saved["width"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(RECIPE), required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"data and checkpoints (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = cifar_data(args.cache)
    print(data.description, flush=True)
    model = build(args.model, data)
    recipe = RECIPE[args.model]
    started = time.perf_counter()
    stats = train(model, data.train, **recipe, seed=0, augment=cifar_augment, amp=False, device="cpu",
                  progress=f"training {args.model}", checkpoint=args.cache / "checkpoints" / f"{args.model}.ckpt")
    accuracy = evaluate(model, data.val, device="cpu")
    print(f"{args.model}: {accuracy:.2f}% val top-1 after {stats.epochs:g} epochs, {stats.seconds:.0f} s of "
          f"training ({time.perf_counter() - started:.0f} s this sitting)", flush=True)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "val_accuracy": accuracy, "recipe": recipe,
                "width": EDGENET_WIDTH if args.model == "edgenet" else None}, MODELS_DIR / f"{args.model}.pt")
    index = MODELS_DIR / "base.json"
    entries = json.loads(index.read_text()) if index.exists() else {}
    entries[args.model] = {
        "command": "python bench/prove_base.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "val_top1": round(accuracy, 2), "val_images": len(data.val), "train_images": len(data.train),
        "train_seconds": round(stats.seconds, 1), "epochs": stats.epochs, "epoch_losses": [round(v, 4) for v in stats.epoch_losses],
        "final_train_top1": round(stats.train_accuracy, 2), "recipe": recipe,
        "params": sum(q.numel() for q in model.parameters()), "machine": machine(), "commit": commit()}
    index.write_text(json.dumps(entries, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
