"""The deployment bundle: what `selected/` holds besides the model, for the device.

`run.py` (this folder) is copied as it is: it imports neither torch nor edgeopt, only
onnxruntime, numpy and Pillow, and reads how to prepare an input from the model's metadata.
`README.template.md` becomes the bundle's README.md, filled in for the target and the model.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cascade runner beside this module must import without torch
    from edgeopt.hw_models.targets import HardwareTarget

RUNNER = "run.py"
README_TEMPLATE = "README.template.md"


def runner_source() -> Path:
    """The path of the bundle's run.py inside the installed package."""
    return Path(str(resources.files(__name__).joinpath(RUNNER)))


def _profile_arguments(model: str, preprocessing: dict) -> tuple[str, str]:
    """`optimize profile` options for this model, and a note where it cannot be profiled as is:
    the profiler builds torchvision architectures by name."""
    h, w = preprocessing["input_size"]
    classes = len(preprocessing.get("class_names") or []) or 1000
    # The profiler builds 3-channel networks; a grey model differs from one in its first layer only.
    size = f"--input-size {h if h == w else f'{h}x{w}'} --num-classes {classes}"
    grey = (" The profiler builds it for 3-channel input: only the first layer's shape differs from this "
            "grey model's." if preprocessing.get("channels", 3) != 3 else "")
    if model.startswith("torchvision "):
        name = model.split()[1].rstrip(",")
        return f"--model {name} {size}", ("Its rows are this model's layer shapes, at fp32 and int8 and at "
                                          "keep ratios 1, 0.75, 0.5 and 0.25." + grey)
    return (f"--model ARCH {size}",
            "`--model` takes a torchvision architecture, and this model is not one: give the one whose "
            "layers are most like it (mobilenet_v2 for depthwise inverted-residual blocks, resnet18 for "
            "plain 3x3 convolutions). Shapes the table lacks come from the model the profiler fits to "
            "the ones it has." + grey)


def write_bundle(folder: str | Path, *, target: HardwareTarget, model: str, preprocessing: dict,
                 preprocessing_text: str, latency: str, budgets: Sequence[str] = ()) -> list[Path]:
    """Copy run.py into `folder` (which holds model.onnx) and write its README.md for `target`.

    `model` is the one-line model description of the run, `latency` the selected model's latency
    on the target as report.md gives it (for example "2.31 ms (lut)"). Returns the files written.
    """
    folder = Path(folder)
    runner = folder / RUNNER
    shutil.copyfile(runner_source(), runner)
    runner.chmod(0o755)
    profile, profile_note = _profile_arguments(model, preprocessing)
    names = list(preprocessing.get("class_names") or [])
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    note = target.deploy_note()
    threads_text = f"{target.threads} thread{'s' if target.threads != 1 else ''}"
    template = string.Template(resources.files(__name__).joinpath(README_TEMPLATE).read_text())
    text = template.substitute(
        model=model, target=target.name, threads=target.threads, preprocessing=preprocessing_text,
        budgets=f"budget {', '.join(budgets)}" if budgets else "no budget recorded",
        classes=f"{len(names)}: {shown}" if names else "not recorded (run.py prints class indices)",
        threads_text=threads_text, latency=f"{latency}, for {target.runtime}, {threads_text}",
        runtime=note if note is not None else (f"The `{target.name}` latency figures are for {target.runtime}, "
                                               "the runtime this bundle runs."),
        latency_kind=target.latency_note(), profile=profile, profile_note=profile_note,
        table=f"{target.name}-onnxruntime.csv",
        budget_args=" ".join(f"--budget {b}" for b in budgets) or "--budget BUDGET",
    )
    readme = folder / "README.md"
    readme.write_text(text)
    return [runner, readme]
