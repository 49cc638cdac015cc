"""A local worker process: `python -m edgeopt.search.worker SPEC INDEX` adds trials to the study
that `optimize(..., workers=N)` runs, then exits; the parent fine-tunes and selects once."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    from edgeopt.search.optimize import prepare, run_search

    spec_path, index = Path(argv[0]), int(argv[1])
    spec = torch.load(spec_path, weights_only=False)  # written by our own parent process
    search = spec["search"]
    context, study = prepare(spec["model"], spec["data"], target=spec["target"], budgets=spec["budgets"],
                             search=search, out_dir=spec_path.parent, seed=search.seed + index)
    run_search(context, study, search.trials, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
