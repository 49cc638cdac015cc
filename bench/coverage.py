"""Coverage of the named models users bring: the check the test suite runs on small members of
each family (tests/coverage.py), here on the named torchvision and timm models themselves.

    python bench/coverage.py                      # every model, results cached per model
    python bench/coverage.py --only resnet50,vit_b_16 --size 64

Each model runs in its own process with a time limit (a hang is a result too). Results go to
bench/results/coverage.json as they come (a rerun skips models already there unless --again) and
a markdown table is printed for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "coverage.json"

# (name, input size): every torchvision classification family's smallest member and the timm
# families of the test suite, each named as a user would type it.
TORCHVISION = [("alexnet", 64), ("vgg11", 32), ("resnet18", 32), ("resnext50_32x4d", 32), ("wide_resnet50_2", 32),
               ("squeezenet1_1", 64), ("densenet121", 32), ("googlenet", 64), ("inception_v3", 80),
               ("mobilenet_v2", 32), ("mobilenet_v3_small", 32), ("mobilenet_v3_large", 32), ("mnasnet0_5", 32),
               ("shufflenet_v2_x0_5", 32), ("efficientnet_b0", 32), ("efficientnet_v2_s", 32),
               ("regnet_x_400mf", 32), ("regnet_y_400mf", 32), ("convnext_tiny", 32), ("vit_b_16", 32),
               ("swin_t", 64), ("swin_v2_t", 64), ("maxvit_t", 224)]


def _timm_models() -> list[tuple[str, int]]:
    sys.path.insert(0, str(ROOT))
    from tests.coverage_families import TIMM, TIMM_BENCH

    # The test builds a small EfficientFormer of its own classes; the named one fixes its
    # attention at 7x7 tokens, which needs 224x224.
    named = {"efficientformer": ("efficientformer_l1", 224), "res2net": ("res2net50_14w_8s", 64)}
    return [(f"timm:{named.get(name, (name, max(size, 64)))[0]}", named.get(name, (name, max(size, 64)))[1])
            for name, (_, size) in (TIMM | TIMM_BENCH).items()]


def _build(spec: str, size: int):
    if spec.startswith("timm:"):
        import timm

        name = spec[5:]
        kwargs = {"img_size": size} if timm.create_model(name).default_cfg.get("fixed_input_size") else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    import torchvision

    kwargs = {"image_size": size} if spec.startswith("vit") else {"input_size": (size, size)} if spec.startswith("maxvit") else {}
    if spec in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    return torchvision.models.get_model(spec, weights=None, num_classes=10, **kwargs)


def _one(spec: str, size: int, space_only: bool) -> dict:
    """Run in the child process: the coverage check of one named model (or its space alone)."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from tests.coverage import check_family

    with tempfile.TemporaryDirectory() as tmp:
        result = check_family(spec, _build(spec, size), size, Path(tmp), plans=not space_only)
    return {"from_model_s": round(result.from_model_seconds, 2), "space": result.headline,
            "plans": [{"plan": c.name, "ok": c.ok, "integer_only": c.integer_only, "exact": c.exact, "flips": c.flips,
                       "own_flips": c.own_flips, "max_diff": c.max_diff,
                       "own_spread": c.own_spread, "scale": c.scale, "flip_leads": c.flip_leads, "seconds": round(c.seconds, 2)}
                      for c in result.plans]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated model names")
    p.add_argument("--size", type=int, default=None, help="input size for every model (default: per model)")
    p.add_argument("--limit", type=float, default=600, help="seconds a model may take (default 600)")
    p.add_argument("--again", action="store_true", help="measure models already in the results again")
    p.add_argument("--space-only", action="store_true",
                   help="only build each model's space (from_model's time and summary), no plans")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args.child[0], int(args.child[1]), args.child[2] == "space")))
        return 0
    models = TORCHVISION + _timm_models()
    if args.only:
        wanted = set(args.only.split(","))
        models = [(n, s) for n, s in models if n in wanted or n.removeprefix("timm:") in wanted]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    from edgeopt.evaluators.cpu import cpu_flags

    results["_machine"] = {"cpu": platform.processor() or platform.machine(),
                           "vnni": bool(cpu_flags() & {"avx512_vnni", "avx_vnni"}),
                           "avx512": "avx512f" in cpu_flags()}
    for name, size in models:
        size = args.size or size
        if name in results and not args.again and (args.space_only or results[name].get("plans")):
            continue
        started = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--child", name, str(size),
                                  "space" if args.space_only else "plans"], capture_output=True,
                                 text=True, timeout=args.limit, cwd=ROOT)
            if out.returncode == 0:
                entry = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
                entry = {"error": lines[-1][:300] if lines else f"exit {out.returncode}"}
        except subprocess.TimeoutExpired:
            entry = {"error": f"did not finish in {args.limit:.0f} s"}
        entry.update(size=size, seconds=round(time.perf_counter() - started, 1))
        results[name] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(entry)[:300], flush=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    rows = ["| model | input | from_model (s) | space | plans passing | top-1 flips (own) per plan | largest score difference / own spread | total (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        if "error" in r:
            rows.append(f"| {name} | {r['size']} | | **{r['error']}** | | | | {r['seconds']} |")
            continue
        plans = r["plans"]
        if not plans:
            rows.append(f"| {name} | {r['size']} | {r['from_model_s']} | {r['space']} | not run | | | {r['seconds']} |")
            continue
        ok = sum(p["ok"] for p in plans)
        ties = ", ".join(f"{p['flips']} ({p['own_flips']})" for p in plans)
        worst = max(plans, key=lambda p: p["max_diff"] / max(p["own_spread"], 1e-12))
        rows.append(f"| {name} | {r['size']} | {r['from_model_s']} | {r['space']} | {ok}/{len(plans)} | {ties} "
                    f"| {worst['max_diff']:.2g} / {worst['own_spread']:.2g} | {r['seconds']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
