"""How long the test suite's coverage check (tests/coverage.py's `check_family`) takes on chosen
families, one thread, with the library and tests of any checkout: for timing a change to the
export, `apply_plan` or `from_model` against the commit before it, alternating the two trees in
one sitting (this VM's speed drifts by a third between sittings).

    git worktree add --detach /tmp/before HEAD~1
    python bench/coverage_time.py --tree /tmp/before inception_v3 cspresnet50
    python bench/coverage_time.py --tree . inception_v3 cspresnet50

Prints each family's seconds, its `from_model` seconds and each plan's, whether every plan
passed, and the total. Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout whose edgeopt and tests/ are timed (default: this one)")
    p.add_argument("families", nargs="+", help="names from tests/coverage_families.py (TORCHVISION or TIMM)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    import torch

    import edgeopt
    from tests.coverage import check_family
    from tests.coverage_families import TIMM, TORCHVISION

    torch.set_num_threads(1)
    print(f"edgeopt from {Path(edgeopt.__file__).parent}")
    total = 0.0
    for family in args.families:
        build, size = (TIMM if family in TIMM else TORCHVISION)[family]
        torch.manual_seed(0)
        model = build()
        started = time.perf_counter()
        result = check_family(family, model, size, Path(tempfile.mkdtemp()))
        seconds = time.perf_counter() - started
        total += seconds
        print(f"{family}: {seconds:.1f} s, from_model {result.from_model_seconds:.1f} s, plans "
              f"{[round(c.seconds, 1) for c in result.plans]}, all passed: {all(c.ok for c in result.plans)}", flush=True)
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
