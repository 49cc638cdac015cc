"""The one training loop: the default model's first training and every candidate's fine-tuning.

AdamW with a short linear warm-up and a cosine decay to zero. Why AdamW rather than SGD: the
same loop must serve a network trained from scratch in a couple of minutes and compressed
candidates fine-tuned for one or two epochs, across whatever architectures users bring; Adam's
per-parameter step sizes make one learning rate work across them and across the gradient scales
that pruning and straight-through fake quantization produce, where SGD needs a rate tuned per
model. Weight decay is decoupled and spares biases and normalization parameters, as usual. The
warm-up keeps Adam's first, poorly estimated steps from knocking quantized weights off their grid.

With a `teacher` (the uncompressed model), the loss mixes cross-entropy on the labels with the
KL divergence to the teacher's softened outputs (Hinton et al., 2015), scaled by T^2 so that its
gradient does not shrink as the temperature grows.

On CUDA the forward pass runs under torch.autocast (bfloat16 where supported, else float16 with
a gradient scaler); evaluation always runs in float32, since that accuracy is what is reported.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from edgeopt.errors import EdgeoptError
from edgeopt.search.data import batches


class NonFiniteLoss(EdgeoptError):
    """The loss became NaN or infinite; raised at once, with the step, so a caller can drop the
    candidate (a diverging fine-tune) and go on with the others."""

    def __init__(self, *, step: int, total_steps: int, value: float, lr: float) -> None:
        self.step = step
        self.total_steps = total_steps
        self.value = value
        self.lr = lr
        super().__init__(
            f"The training loss became {value} at step {step} of {total_steps} (learning rate "
            f"{lr:.3g}). Lower the learning rate, or check the data for NaN or infinite values.")


@dataclass(frozen=True, kw_only=True)
class TrainStats:
    """What a training run did, for reports and for choosing between runs."""

    steps: int
    epochs: float  # steps / steps per epoch
    seconds: float
    images_per_second: float
    first_loss: float  # the first step's loss
    final_loss: float  # mean over the last epoch's steps (or all, if less than one epoch)
    train_accuracy: float  # top-1 in percent over the same steps, on augmented inputs
    epoch_losses: tuple[float, ...]  # mean loss of each epoch begun
    device: str
    amp: str | None  # "bfloat16", "float16" or None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _logits(output: object) -> torch.Tensor:
    # Some torchvision models (GoogLeNet, Inception v3) return (logits, aux logits) when training.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EdgeoptError(f"The model returned {type(output).__name__}; it must return a tensor of "
                       f"class scores (logits).")


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Biases and normalization scales are vectors; decaying them only hurts.
            (decay if param.dim() > 1 else no_decay).append(param)
    if not decay and not no_decay:
        raise EdgeoptError("The model has no trainable parameters, so it cannot be trained or "
                           "fine-tuned; unfreeze its parameters (requires_grad=True).")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(total_steps: int) -> Callable[[int], float]:
    warmup = max(1, min(100, total_steps // 20))

    def factor(step: int) -> float:  # multiplies lr before step `step` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _check(epochs: float, lr: float, batch_size: int, distill_weight: float, temperature: float) -> None:
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise EdgeoptError(f"The number of epochs must be a positive number, got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise EdgeoptError(f"The learning rate must be a positive number, got {lr!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EdgeoptError(f"The batch size must be a positive whole number, got {batch_size!r}.")
    if not 0.0 <= distill_weight <= 1.0:
        raise EdgeoptError(f"The distillation weight must be between 0 and 1, got {distill_weight!r}.")
    if not temperature > 0:
        raise EdgeoptError(f"The distillation temperature must be positive, got {temperature!r}.")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened outputs, times T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def train(model: nn.Module, dataset: Dataset, *, epochs: float, lr: float, batch_size: int = 64,
          teacher: nn.Module | None = None, distill_weight: float = 0.5, temperature: float = 2.0,
          weight_decay: float = 0.01, seed: int = 0, device: torch.device | str | None = None,
          augment: Callable[[torch.Tensor], torch.Tensor] | None = None, amp: bool | None = None,
          progress: str | None = None, checkpoint: str | Path | None = None) -> TrainStats:
    """Train `model` in place on (image, label) pairs; it ends in eval mode on its own device.

    `epochs` may be fractional (0.5 = half a pass). With `teacher`, the loss is
    (1 - distill_weight) * cross-entropy + distill_weight * T^2 * KL at `temperature`.
    `augment` maps an input batch to an augmented one (see `random_affine`). `device` defaults to
    CUDA when present; `amp` (default: on for CUDA) runs the forward pass under autocast.
    `progress` is the label of a progress bar on stderr (None: no bar). A NaN or infinite loss
    raises `NonFiniteLoss` at that step. The global random state is left as it was.

    With `checkpoint` (a file path), the whole training state (weights, optimizer, schedule,
    random state, the statistics so far) is written there after every epoch, and a run that finds
    a checkpoint of the same recipe resumes after its last epoch: an interrupted run loses at
    most one epoch, and a resumed one ends with the weights an uninterrupted run would have. A
    checkpoint of another recipe (steps, batch size, learning rate, seed, ...) is an error, not
    silently reused. The file stays when training ends; delete it to train anew.
    """
    _check(epochs, lr, batch_size, distill_weight, temperature)
    n = len(dataset)
    if n == 0:
        raise EdgeoptError("There are no training images; check --data.")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size  # whole batches only: a batch of one breaks BatchNorm
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    device = torch.device(device) if device is not None else default_device()
    use_amp = (device.type == "cuda") if amp is None else bool(amp)
    amp_dtype = None
    if use_amp:
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    home = _device_of(model)
    teacher_home = _device_of(teacher) if teacher is not None else None
    teacher_was_training = teacher.training if teacher is not None else False
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps))

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=progress, file=sys.stderr, disable=progress is None,
               leave=False, mininterval=0.5, unit="step")
    epoch_losses: list[float] = []
    recent: deque[tuple[float, int, int]] = deque(maxlen=steps_per_epoch)  # (loss, correct, seen)
    first_loss = math.nan
    step = 0
    epoch = 0
    recipe = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
              "lr": float(lr), "weight_decay": float(weight_decay), "seed": seed, "images": n,
              "distill_weight": float(distill_weight) if teacher is not None else None,
              "temperature": float(temperature) if teacher is not None else None,
              "amp": None if amp_dtype is None else str(amp_dtype)}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    saved = _load_checkpoint(checkpoint, recipe) if checkpoint is not None else None
    done_before = 0.0  # seconds spent by the runs this one resumes
    started = time.perf_counter()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            model.to(device).train()
            if teacher is not None:
                teacher.to(device).eval()
            if saved is not None:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                scaler.load_state_dict(saved["scaler"])
                torch.set_rng_state(saved["rng"])
                if device.type == "cuda" and saved.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(saved["cuda_rng"], device)
                step, epoch, first_loss = saved["step"], saved["epoch"], saved["first_loss"]
                epoch_losses = list(saved["epoch_losses"])
                recent.extend(tuple(r) for r in saved["recent"])
                done_before = saved["seconds"]
                bar.update(step)
            while step < total_steps:
                epoch_sum, epoch_steps = 0.0, 0
                for x, y in batches(dataset, batch_size, shuffle=True, seed=seed * 100_003 + epoch,
                                    drop_last=True):
                    if step >= total_steps:
                        break
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    if augment is not None:
                        x = augment(x)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = _logits(model(x)).float()
                        loss = F.cross_entropy(logits, y)
                        if teacher is not None and distill_weight > 0:
                            with torch.no_grad():
                                target = _logits(teacher(x)).float()
                            loss = ((1 - distill_weight) * loss
                                    + distill_weight * distillation_loss(logits, target, temperature))
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise NonFiniteLoss(step=step + 1, total_steps=total_steps, value=value,
                                            lr=optimizer.param_groups[0]["lr"])
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    if step == 1:
                        first_loss = value
                    epoch_sum += value
                    epoch_steps += 1
                    recent.append((value, int((logits.detach().argmax(1) == y).sum()), len(y)))
                    bar.update()
                    if bar.n % 10 == 0:
                        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                epoch_losses.append(epoch_sum / max(1, epoch_steps))
                epoch += 1
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, {
                        "recipe": recipe, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "step": step, "epoch": epoch, "first_loss": first_loss,
                        "epoch_losses": epoch_losses, "recent": list(recent),
                        "seconds": done_before + time.perf_counter() - started})
    finally:
        bar.close()
        model.eval()  # also re-snaps fake-quantized weights onto their grid
        model.to(home)
        if teacher is not None:
            teacher.to(teacher_home).train(teacher_was_training)
    seconds = done_before + time.perf_counter() - started
    return TrainStats(
        steps=step,
        epochs=step / steps_per_epoch,
        seconds=seconds,
        images_per_second=step * batch_size / seconds if seconds > 0 else math.inf,
        first_loss=first_loss,
        final_loss=sum(r[0] for r in recent) / max(1, len(recent)),
        train_accuracy=100.0 * sum(r[1] for r in recent) / max(1, sum(r[2] for r in recent)),
        epoch_losses=tuple(epoch_losses),
        device=str(device),
        amp=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
    )


def _load_checkpoint(path: Path, recipe: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a file we cannot read is reported, whatever broke it
        raise EdgeoptError(f"The training checkpoint {path} cannot be read ({exc}); delete it to "
                           f"train from the start.") from exc
    if saved.get("recipe") != recipe:
        differ = sorted(k for k in recipe if saved.get("recipe", {}).get(k) != recipe[k])
        raise EdgeoptError(f"The training checkpoint {path} is of another recipe (it differs in "
                           f"{', '.join(differ) or 'its format'}); delete it to train from the start, "
                           f"or train with the recipe it was made with.")
    return saved


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash while writing leaves the previous epoch's checkpoint whole


# On a CPU, an evaluation batch holds about EVAL_FLOATS_PER_MODULE floats per module of the model in
# its widest activation, in a power of two of images from MIN_EVAL_BATCH to GPU_EVAL_BATCH: a wide
# batch runs slower per image once its activations outgrow the caches, and a narrow one pays each
# module's per-call overhead more often, so models of many small modules want wider batches. Fitted
# on `python bench/eval_batch.py` (BENCHMARKS.md, "Trial cost on the edgenet"), where it picks the
# fastest size or one within 2% of it: the edgenet at 32x32 (48 modules, 65,536 floats per image)
# 32, mobilenet_v3_small at 224x224 32 and at 64x64 256, efficientnet_b0 at 64x64 128, resnet18 at
# 224x224 4; batches of 256 had taken the edgenet's 2,000 proxy images 1.7x as long. A GPU takes
# batches of GPU_EVAL_BATCH.
EVAL_FLOATS_PER_MODULE = 2**15
MIN_EVAL_BATCH, GPU_EVAL_BATCH = 4, 256


def evaluation_batch_size(model: nn.Module, image: torch.Tensor, device: torch.device) -> int:
    """Images per evaluation batch of `model` on `device`, `image` one input without its batch
    dimension. On a CPU, EVAL_FLOATS_PER_MODULE times the model's module count over one image's
    widest activation (measured on one forward pass), to the nearest power of two, within
    MIN_EVAL_BATCH and GPU_EVAL_BATCH."""
    if device.type != "cpu":
        return GPU_EVAL_BATCH
    widest = [1]

    def record(module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            widest[0] = max(widest[0], output[0].numel())

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model(image.unsqueeze(0).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    images = EVAL_FLOATS_PER_MODULE * len(hooks) / widest[0]
    return max(MIN_EVAL_BATCH, min(GPU_EVAL_BATCH, 2 ** round(math.log2(images))))


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int | None = None,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent, in float32. The model is left in eval mode on its own device.
    `batch_size` None: `evaluation_batch_size`'s."""
    predicted, labels = predict(model, dataset, batch_size=batch_size, device=device)
    return 100.0 * float((predicted == labels).double().mean())


def _logits_by_batch(model: nn.Module, dataset: Dataset, *, batch_size: int | None,
                     device: torch.device | str | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits on `device`, labels) of `dataset` batch by batch, `model` in eval mode on `device`
    and moved back to its own device after. `batch_size` None: `evaluation_batch_size`'s."""
    if len(dataset) == 0:
        raise EdgeoptError("There are no images to evaluate on; check --data.")
    device = torch.device(device) if device is not None else default_device()
    home = _device_of(model)
    model.eval().to(device)
    try:
        batch_size = batch_size or evaluation_batch_size(model, dataset[0][0], device)
        for x, y in batches(dataset, batch_size):
            yield _logits(model(x.to(device))), y
    finally:
        model.to(home)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, *, batch_size: int | None = None,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) of every image of `dataset`, as CPU tensors. The model runs in
    eval mode on `device` and is moved back to its own device after. `batch_size` None:
    `evaluation_batch_size`'s."""
    predicted, labels = [], []
    for logits, y in _logits_by_batch(model, dataset, batch_size=batch_size, device=device):
        predicted.append(logits.argmax(1).cpu())
        labels.append(y)
    return torch.cat(predicted), torch.cat(labels)


@torch.no_grad()
def confidences(model: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(highest softmax probability, whether top-1 is right) of every image of `dataset`: what a
    cascade's threshold reads."""
    confidence, right = [], []
    for logits, y in _logits_by_batch(model, dataset, batch_size=None, device=None):
        top, predicted = torch.softmax(logits.float(), dim=1).cpu().max(1)
        confidence.append(top)
        right.append(predicted == y)
    return torch.cat(confidence), torch.cat(right)


def random_affine(x: torch.Tensor, *, degrees: float = 10.0, scale: float = 0.1,
                  pixels: float = 2.0) -> torch.Tensor:
    """Rotate each image by up to `degrees`, scale it by up to 1 +- `scale` and move it by up to
    `pixels` (edges repeated). Cheap augmentation that suits digits and small natural images
    alike, unlike flips (a flipped 2 is not a 2); it is what gets the default model above 97%
    from 3,200 MNIST images."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, device=x.device) * 2 - 1) * scale
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * pixels
    theta = torch.empty(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.cos(angle) / zoom
    theta[:, 0, 1] = -torch.sin(angle) / zoom
    theta[:, 1, 0] = torch.sin(angle) / zoom
    theta[:, 1, 1] = torch.cos(angle) / zoom
    theta[:, 0, 2] = shift[:, 0] * 2 / w  # affine_grid works in [-1, 1] coordinates
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
