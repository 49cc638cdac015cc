"""A local worker process: `python -m edgeopt.search.worker SPEC INDEX` adds trials to the study
that `optimize(..., workers=N)` runs, then takes fine-tune tasks of it (edgeopt.search.tasks)
until its parent needs no more; the parent selects and exports once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    from edgeopt.search.finetune import FinetuneStore, task_work
    from edgeopt.search.optimize import prepare, run_search
    from edgeopt.search.tasks import FinetuneTasks

    spec_path, index = Path(argv[0]), int(argv[1])
    spec = torch.load(spec_path, weights_only=False)  # written by our own parent process
    search = spec["search"]
    torch.set_num_threads(spec["threads"])
    context, study = prepare(spec["model"], spec["data"], target=spec["target"], budgets=spec["budgets"],
                             search=search, out_dir=spec_path.parent, seed=search.seed + index)
    run_search(context, study, search.trials, progress=False)
    tasks = FinetuneTasks(study._storage, search.study_name)
    parent_pid = int(spec["parent"].rpartition(":")[2])
    tasks.serve(task_work(context, data=spec["data"], store=FinetuneStore(spec["store"]), progress=False),
                stop=lambda: os.getppid() != parent_pid or tasks.run_done(spec["run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
