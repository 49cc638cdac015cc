"""The model to compress: the built-in `edgenet`, or the user's own, checked against the data.

`resolve_model` accepts, in this order:

- None or "edgenet": the built-in demo CNN, trained on first use on the data's train split and
  cached as a state dict, so the next run loads it in a second;
- a path to a saved model: TorchScript (`torch.jit.save`) or a whole pickled model
  (`torch.save(model)`; unpickling runs code from the file, so only load files you trust);
- "package.module:factory": imported (the current directory is importable) and called with
  `num_classes=` when it takes that argument, else with no arguments;
- "timm:NAME": any timm architecture ("timm:mobilenetv3_large_100"), built with random weights,
  the data's number of classes and input channels (timm is an optional dependency);
- a torchvision model name ("resnet18", "mobilenet_v3_small", ...), built with random weights
  and the data's number of classes; its first convolution is rebuilt for 1-channel data (mnist,
  digits). Pass `weights` with trained weights: compressing an untrained model says nothing.

`weights` is a state-dict file loaded with strict=True (a checkpoint that wraps it under
"state_dict" or "model", or whose keys carry DataParallel's "module." prefix, is unwrapped).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.search.data import DataBundle
from edgeopt.search.training import evaluate, random_affine, train

EDGENET_VERSION = 1  # bump when the architecture or its training recipe changes: old caches go stale
DEFAULT_EPOCHS = 15.0
DEFAULT_WIDTH = 16  # channels of the first layers; the others are multiples of it
_FORMS = ("edgenet (the built-in demo model), a torchvision model name such as resnet18, "
          "timm:NAME for a timm architecture, 'package.module:factory', or a path to a saved "
          "TorchScript or whole-model file")


# --- edgenet ----------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                                         groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention (MobileNetV3's): couples a block's channels, so pruning must respect it."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class ResidualBlock(nn.Module):
    """Two 3x3 convs and an identity shortcut (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(self.conv1(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project (+ shortcut)."""

    def __init__(self, cin: int, cout: int, *, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        self.se = SqueezeExcite(hidden)
        self.project = _conv_bn(hidden, cout, 1, relu=False)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.shortcut else y


class EdgeNet(nn.Module):
    """The built-in demo model: small enough to train in a minute on two CPU cores, with the
    structures that make compression non-trivial: a residual block (coupled channels), depthwise
    inverted-residual blocks with squeeze-excite, and a 1x1 head conv. Channel counts are
    multiples of 8, so every 1/8 keep ratio prunes whole channels."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn(in_channels, w, 3, stride=2)
        self.block1 = ResidualBlock(w)
        self.block2 = InvertedResidual(w, 3 * w // 2, expand=4, stride=2)
        self.block3 = InvertedResidual(3 * w // 2, 3 * w // 2, expand=4, stride=1)
        self.head = _conv_bn(3 * w // 2, 6 * w, 1)
        self.classifier = nn.Linear(6 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.classifier(self.head(x).mean((2, 3)))


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_CACHE") or Path.home() / ".cache" / "edgeopt")


def _cache_path(data: DataBundle, cache_dir: Path, epochs: float, width: int = DEFAULT_WIDTH) -> Path:
    c, h, w = data.input_shape
    # float(epochs): 40 and 40.0 are one recipe. The default width keeps its old key (and caches).
    key = (EDGENET_VERSION, float(epochs), data.fingerprint) + (() if width == DEFAULT_WIDTH else (width,))
    recipe = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in data.name)
    wide = "" if width == DEFAULT_WIDTH else f"-w{width}"
    return cache_dir / (f"edgenet-v{EDGENET_VERSION}{wide}-{safe_name}-{c}x{h}x{w}-{data.num_classes}c-"
                        f"seed{data.seed}-{recipe}.pt")


def default_model(data: DataBundle, *, cache_dir: Path | None = None, epochs: float = DEFAULT_EPOCHS,
                  width: int = DEFAULT_WIDTH, progress: bool = True) -> tuple[EdgeNet, str]:
    """edgenet for `data`: loaded from the cache, or trained on `data.train` and cached.

    The cache key holds the architecture version and width, the epochs and a digest of the
    train split, so changed data or a changed recipe trains anew instead of loading a stale model.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = _cache_path(data, cache_dir, epochs, width)
    c = data.input_shape[0]
    params = _params(EdgeNet(c, data.num_classes, width=width))
    about = f"edgenet v{EDGENET_VERSION} width {width} (residual + depthwise inverted-residual + squeeze-excite, {params:,} params)"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = EdgeNet(c, data.num_classes, width=width)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), (f"{about}, trained on {data.name} ({saved['val_accuracy']:.1f}% val "
                                  f"top-1), loaded from {path}")
        except Exception as exc:  # noqa: BLE001 -- whatever is wrong with it, training again fixes it
            warnings.warn(f"The cached model {path} could not be read ({exc}); training it again.",
                          stacklevel=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)  # the same data and seed give the same initial weights
        model = EdgeNet(c, data.num_classes, width=width)
    # Measured on mnist: 15 epochs at this rate reach about 98% val top-1 (12 epochs: 97.2%).
    # No autocast even on CUDA: the model is too small to gain from it, and bfloat16 cost it
    # 1.4 points of accuracy there.
    stats = train(model, data.train, epochs=epochs, lr=0.02, batch_size=128, weight_decay=0.05,
                  seed=data.seed, augment=random_affine, amp=False,
                  progress=f"training edgenet on {data.name} (first use; cached after)" if progress else None)
    accuracy = evaluate(model, data.val)
    state = {"state_dict": model.state_dict(), "val_accuracy": accuracy, "seconds": stats.seconds,
             "epochs": epochs, "width": width, "version": EDGENET_VERSION, "data": data.description}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a parallel worker never reads half a file.
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(state, partial)
        os.replace(partial, path)
        where = f"cached in {path}"
    except OSError as exc:
        warnings.warn(f"Could not cache the trained model in {cache_dir} ({exc}); set EDGEOPT_CACHE "
                      f"to a writable folder to skip training next time.", stacklevel=2)
        where = "not cached"
    return model, (f"{about}, trained on {data.name} in {stats.seconds:.0f} s "
                   f"({accuracy:.1f}% val top-1), {where}")


# --- the user's models ------------------------------------------------------------------------


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


class _CurrentDirImportable:
    """Make the current directory importable for a while, as `python -m` would: the console
    script `optimize` otherwise cannot import the user's own modules or unpickle their classes."""

    def __enter__(self) -> None:
        self.added = os.getcwd() not in sys.path and "" not in sys.path
        if self.added:
            sys.path.insert(0, os.getcwd())

    def __exit__(self, *exc: object) -> None:
        if self.added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _from_factory(spec: str, data: DataBundle) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EdgeoptError(f"--model {spec!r}: write 'package.module:factory'.")
    try:
        with _CurrentDirImportable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise EdgeoptError(f"--model {spec!r}: cannot import {module_name} ({exc}). Run from the "
                           f"folder that holds it, or install it.") from exc
    except Exception as exc:  # noqa: BLE001 -- the user's module failed while importing
        raise EdgeoptError(f"--model {spec!r}: importing {module_name} failed with "
                           f"{type(exc).__name__}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise EdgeoptError(f"--model {spec!r}: {module_name} has no attribute {attr!r}.")
        target = getattr(target, part)
    if isinstance(target, nn.Module):  # a ready-made model object
        return target
    if not callable(target):
        raise EdgeoptError(f"--model {spec!r}: {attr} is not callable; point at a function or class "
                           f"that returns an nn.Module.")
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = {}
    named = "num_classes" in parameters
    # A **kwargs factory (torchvision's builders) usually forwards num_classes; nn.Module's own
    # __init__ also shows **kwargs but refuses it, hence the retry without it.
    maybe = not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    call = f"{attr}(num_classes={data.num_classes})" if named or maybe else f"{attr}()"
    try:
        try:
            model = target(num_classes=data.num_classes) if named or maybe else target()
        except TypeError as exc:
            if not maybe or "num_classes" not in str(exc):
                raise
            call = f"{attr}()"
            model = target()
    except Exception as exc:  # noqa: BLE001 -- the user's factory failed
        raise EdgeoptError(f"--model {spec!r}: {call} failed with {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise EdgeoptError(f"--model {spec!r}: {attr}() returned {type(model).__name__}, not a "
                           f"torch.nn.Module.")
    return model


def _load_file(path: Path) -> tuple[nn.Module, str]:
    try:
        return torch.jit.load(str(path), map_location="cpu"), "TorchScript"
    except Exception:  # noqa: BLE001 -- not TorchScript; try a pickled model next
        pass
    try:
        with _CurrentDirImportable(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise EdgeoptError(f"--model {path}: unpickling the model needs the code that defined its "
                           f"class ({exc}). Run from the folder that holds that code, save the model "
                           f"with torch.jit.save(torch.jit.script(model), path) instead, or pass "
                           f"--model package.module:factory with --weights.") from exc
    except Exception as exc:  # noqa: BLE001 -- any other unreadable file
        raise EdgeoptError(f"--model {path} is neither a TorchScript file nor a model saved with "
                           f"torch.save(model, path) ({type(exc).__name__}: {exc}).") from exc
    if isinstance(obj, nn.Module):
        return obj, f"saved {type(obj).__name__}"
    if isinstance(obj, dict):
        raise EdgeoptError(f"--model {path} holds weights (a state dict), not a model. Pass it as "
                           f"--weights {path}, with --model naming the architecture (a torchvision "
                           f"name or package.module:factory).")
    raise EdgeoptError(f"--model {path} holds a {type(obj).__name__}, not a torch.nn.Module.")


def _first_conv_for(model: nn.Module, channels: int) -> bool:
    """Rebuild the first 3-channel conv for `channels` inputs (1-channel mnist/digits on a
    torchvision model); its weights are random anyway. True when something changed."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == channels or module.in_channels != 3 or module.groups != 1:
                return False
            new = nn.Conv2d(channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation,
                            bias=module.bias is not None, padding_mode=module.padding_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return True
    return False


def _torchvision(name: str, data: DataBundle) -> tuple[nn.Module, str]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=data.num_classes)
    except Exception as exc:  # noqa: BLE001 -- a builder that rejects these arguments
        raise EdgeoptError(f"--model {name}: torchvision could not build it with {data.num_classes} "
                           f"classes ({type(exc).__name__}: {exc}).") from exc
    adapted = _first_conv_for(model, data.input_shape[0])
    note = f", first conv rebuilt for {data.input_shape[0]}-channel input" if adapted else ""
    return model, f"torchvision {name}{note}"


def _timm(name: str, data: DataBundle) -> tuple[nn.Module, str]:
    try:
        import timm
    except ImportError:
        raise EdgeoptError(f"--model timm:{name} needs timm: pip install timm") from None
    if not name:
        raise EdgeoptError("--model timm: needs an architecture name, for example timm:mobilenetv3_large_100.")
    channels, height, width = data.input_shape
    try:
        model = timm.create_model(name, pretrained=False, num_classes=data.num_classes, in_chans=channels)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {' or '.join('timm:' + c for c in close)}?" if close else ""
        raise EdgeoptError(f"--model timm:{name}: {str(exc).splitlines()[0]}.{hint} `timm.list_models()` "
                           "lists the architectures.") from None
    except Exception as exc:  # noqa: BLE001 -- a builder that rejects these arguments
        raise EdgeoptError(f"--model timm:{name}: timm could not build it for {data.num_classes} classes and "
                           f"{channels} input channels ({type(exc).__name__}: {exc}).") from None
    fixed = model.default_cfg.get("fixed_input_size", False) if hasattr(model, "default_cfg") else False
    wanted = tuple(model.default_cfg.get("input_size", (channels, height, width))[1:]) if fixed else None
    if wanted and wanted != (height, width):
        try:  # vision transformers size their position embedding for one input size
            model = timm.create_model(name, pretrained=False, num_classes=data.num_classes, in_chans=channels,
                                      img_size=(height, width))
        except Exception:  # noqa: BLE001 -- this architecture takes no img_size: check_model_fits says so
            pass
    return model, f"timm {name}"


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def load_weights(model: nn.Module, path: str | Path, *, data: DataBundle | None = None) -> None:
    """Load a state-dict file into `model` strictly, or say exactly what does not fit."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgeoptError(f"--weights {path}: no such file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- pickled code, a corrupt or foreign file
        raise EdgeoptError(f"--weights {path} is not a readable state dict ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}). Save weights with "
                           f"torch.save(model.state_dict(), path); a whole saved model goes to "
                           f"--model instead.") from None
    # Training checkpoints often wrap the weights (Lightning: "state_dict"; torchvision's
    # reference scripts: "model").
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeoptError(f"--weights {path} does not hold a state dict (a mapping of names to "
                           f"tensors); save one with torch.save(model.state_dict(), path).")
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        def first(items: list[str]) -> str:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            return ", ".join(items[:3]) + more

        problems = []
        if missing:
            problems.append(f"missing {first(missing)}")
        if unexpected:
            problems.append(f"unexpected {first(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped {first(misshaped)}")
        context = (f" (the data has {data.input_shape[0]} channel(s) and {data.num_classes} classes)"
                   if data is not None else "")
        raise EdgeoptError(f"--weights {path} does not fit the model{context}: {'; '.join(problems)}. "
                           f"Check that --model names the architecture these weights were trained "
                           f"with, for the same number of classes and input channels.")
    model.load_state_dict(state, strict=True)


def _smallest_working_size(model: nn.Module, channels: int, *, above: int) -> int | None:
    """The smallest of the usual input sizes the model runs on, to suggest to the user."""
    for size in (32, 48, 64, 96, 128, 160, 224, 299):
        if size <= above:
            continue
        try:
            with torch.no_grad():
                model(torch.zeros(2, channels, size, size))
            return size
        except Exception:  # noqa: BLE001 -- still too small (or broken in another way)
            continue
    return None


def check_model_fits(model: nn.Module, data: DataBundle) -> None:
    """Run two images through the model: it must accept the input shape and return
    `num_classes` logits per image."""
    x = data.example_input(2)
    c, h, w = data.input_shape
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 -- whatever the user's forward raises
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        lowered = text.lower()
        if any(s in lowered for s in ("too small", "kernel size", "smaller than", "output size",
                                      "non-positive", "expected more than 1 spatial")):
            size = _smallest_working_size(model, c, above=max(h, w))
            advice = (f"--input-size {size} is the smallest common size that works" if size
                      else "pass a larger --input-size")
            raise EdgeoptError(f"The input size {h}x{w} is too small for the model ({text}); "
                               f"{advice}.") from exc
        raise EdgeoptError(
            f"The model fails on the data's inputs, shape (N, {c}, {h}, {w}) ({text}). If the input "
            f"size is too small or not what the model expects, pass --input-size; if the "
            f"channels differ, use data with the channels the model was built for.") from exc
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise EdgeoptError(f"The model returns {type(out).__name__}; edgeopt compresses classifiers "
                           f"that return a tensor of class scores (N, classes).")
    if tuple(out.shape) != (2, data.num_classes):
        raise EdgeoptError(f"The model returns shape {tuple(out.shape)} for 2 images, but the data has "
                           f"{data.num_classes} classes: it should return (2, {data.num_classes}). "
                           f"Build it for {data.num_classes} classes, or use matching data.")


def resolve_model(spec: str | None, *, data: DataBundle, weights: str | None = None,
                  cache_dir: Path | None = None, progress: bool = True,
                  epochs: float = DEFAULT_EPOCHS) -> tuple[nn.Module, str]:
    """The model to compress, in eval mode on the CPU, and a one-line description of it.

    See the module docstring for the accepted forms. `cache_dir`, `progress` and `epochs` only
    concern the built-in edgenet's first training.
    """
    text = None if spec is None else str(spec).strip()
    if text is None or text.lower() == "edgenet":
        if weights is None:
            model, description = default_model(data, cache_dir=cache_dir, epochs=epochs, progress=progress)
        else:
            model = EdgeNet(data.input_shape[0], data.num_classes)
            load_weights(model, weights, data=data)
            description = f"edgenet v{EDGENET_VERSION} ({_params(model):,} params), weights from {weights}"
        check_model_fits(model, data)
        return model.eval(), description

    path = Path(text).expanduser()
    if path.is_file():
        model, kind = _load_file(path)
        description = f"{path} ({kind}, {{params}} params)"
    elif path.is_dir():
        raise EdgeoptError(f"--model {text} is a folder; {_FORMS} is needed.")
    elif text.lower().startswith("timm:"):
        model, description = _timm(text[len("timm:"):].strip(), data)
        description += " ({params} params)"
    elif ":" in text and not text.startswith(("/", ".", "~")):
        model = _from_factory(text, data)
        description = f"{text} ({type(model).__name__}, {{params}} params)"
    elif text.lower() in _torchvision_names():
        model, description = _torchvision(text.lower(), data)
        description += " ({params} params)"
    elif "/" in text or os.sep in text or path.suffix.lower() in (".pt", ".pth", ".ts", ".pkl", ".jit"):
        raise EdgeoptError(f"--model {text}: no such file.")
    else:
        close = difflib.get_close_matches(text.lower(), ["edgenet"] + _torchvision_names(), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise EdgeoptError(f"--model {text!r} is not something edgeopt knows.{hint} Use {_FORMS}.")
    if weights is not None:
        load_weights(model, weights, data=data)
        description += f", weights from {weights}"
    elif description.startswith(("timm ", "torchvision ")):  # built here, so its weights are random
        warnings.warn(f"--model {text} has random weights: compressing an untrained model tells "
                      f"you nothing about accuracy. Pass --weights with trained weights.", stacklevel=2)
        description += ", random weights (no --weights given)"
    check_model_fits(model, data)  # also gives lazy modules their shapes, so count after it
    return model.eval(), description.replace("{params}", f"{_params(model):,}")
