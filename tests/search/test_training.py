"""The training loop on tiny synthetic problems: learning, distillation, NaN, QAT, bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeopt.errors import EdgeoptError
from edgeopt.search.training import (EVAL_FLOATS_PER_MODULE, GPU_EVAL_BATCH, MIN_EVAL_BATCH, NonFiniteLoss, TrainStats,
                                     evaluate, evaluation_batch_size, predict, random_affine, train)


def _blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two classes of 1x4x4 images told apart by the sign of their mean: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1).view(n, 1, 1, 1)
    return TensorDataset(x, y)


def _mlp(classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))


def test_learns_a_separable_problem() -> None:
    data, held_out = _blobs(), _blobs(seed=1)
    model = _mlp()
    before = evaluate(model, held_out)
    stats = train(model, data, epochs=5, lr=0.01, batch_size=32, device="cpu")
    after = evaluate(model, held_out)
    assert before < 80 and after > 97
    assert not model.training
    assert isinstance(stats, TrainStats)
    assert stats.steps == 5 * (256 // 32) and stats.epochs == 5
    assert len(stats.epoch_losses) == 5 and stats.epoch_losses[-1] < stats.epoch_losses[0]
    assert stats.final_loss < stats.first_loss
    assert stats.train_accuracy > 95
    assert stats.device == "cpu" and stats.amp is None


def test_fractional_epochs_and_small_datasets() -> None:
    model = _mlp()
    assert train(model, _blobs(64), epochs=0.5, lr=0.01, batch_size=8).steps == 4
    # A batch larger than the data shrinks to the data (one step per epoch), never to zero steps.
    assert train(model, _blobs(10), epochs=2, lr=0.01, batch_size=64).steps == 2


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        model = _mlp()
        state = torch.get_rng_state()
        train(model, _blobs(), epochs=1, lr=0.01, batch_size=32, seed=seed,
              augment=lambda x: x + 0.1 * torch.randn_like(x))
        assert torch.equal(torch.get_rng_state(), state)
        return [p.detach().clone() for p in model.parameters()]

    first = run(0)
    assert all(torch.equal(a, b) for a, b in zip(first, run(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, run(1)))


def _kl_to(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(x), 1)
        s = torch.log_softmax(student(x), 1)
        return float(torch.nn.functional.kl_div(s, t, reduction="batchmean", log_target=True))


def test_distillation_pulls_the_student_to_the_teacher() -> None:
    # The teacher disagrees with the labels: a fixed random 3-class function of the input.
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        teacher[1].weight.mul_(3)
    data = _blobs(512)
    x = data.tensors[0]
    labels_only, distilled = _mlp(3), _mlp(3)
    start = _kl_to(distilled, teacher, x)
    train(labels_only, data, epochs=4, lr=0.02, batch_size=64)
    train(distilled, data, epochs=4, lr=0.02, batch_size=64, teacher=teacher, distill_weight=1.0,
          temperature=1.0)
    assert _kl_to(distilled, teacher, x) < 0.2 * start
    assert _kl_to(distilled, teacher, x) < 0.2 * _kl_to(labels_only, teacher, x)
    with torch.no_grad():
        agree = (distilled(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.85
    assert not teacher.training


def test_teacher_keeps_its_mode() -> None:
    teacher = _mlp().train()
    train(_mlp(), _blobs(64), epochs=1, lr=0.01, batch_size=16, teacher=teacher)
    assert teacher.training  # it was training before; it ran in eval mode only inside


def test_nan_loss_raises_at_once_with_the_step() -> None:
    x, y = _blobs(64).tensors
    data = TensorDataset(torch.full_like(x, float("nan")), y)
    model = _mlp()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(NonFiniteLoss) as info:
        train(model, data, epochs=3, lr=0.01, batch_size=16)
    assert info.value.step == 1 and len(calls) == 1
    assert isinstance(info.value, EdgeoptError)
    assert "step 1 of 12" in str(info.value) and "Lower the learning rate" in str(info.value)
    assert not model.training


def test_diverging_learning_rate_raises_non_finite_loss() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(NonFiniteLoss) as info:
        train(model, _blobs(), epochs=50, lr=1e30, batch_size=32)
    assert info.value.step > 1


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": float("nan")}, {"lr": -1.0},
                                    {"batch_size": 0}, {"distill_weight": 1.5}, {"temperature": 0.0}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    settings = {"epochs": 1.0, "lr": 0.01, "batch_size": 8} | kwargs
    with pytest.raises(EdgeoptError):
        train(_mlp(), _blobs(32), **settings)


def test_evaluate_is_exact_top1_percent() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(x), 2)

    y = torch.tensor([0, 0, 0, 1] * 5)
    assert evaluate(Constant(), TensorDataset(torch.zeros(20, 1), y), batch_size=3) == 75.0


def test_evaluation_batches_grow_with_modules_and_shrink_with_activations() -> None:
    cpu = torch.device("cpu")
    image = torch.zeros(3, 32, 32)
    # 6 modules (the Sequential too); the widest output is the 16-channel conv's, 16 x 32 x 32 floats
    # per image: 6 * 2^15 / 2^14 = 12 images, to the nearest power of two 16.
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    assert 6 * EVAL_FLOATS_PER_MODULE / (16 * 32 * 32) == 12
    assert evaluation_batch_size(model, image, cpu) == 16
    # The same layers behind 40 more modules (identities): 46 * 2 = 92 images, to 128.
    deeper = nn.Sequential(*model, *[nn.Identity() for _ in range(40)]).eval()
    assert evaluation_batch_size(deeper, image, cpu) == 128
    wide = nn.Sequential(nn.Conv2d(3, 4096, 3, padding=1)).eval()  # 4M floats per image
    assert evaluation_batch_size(wide, image, cpu) == MIN_EVAL_BATCH
    small = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)).eval()  # 10 floats at most
    assert evaluation_batch_size(small, image, cpu) == GPU_EVAL_BATCH
    assert evaluation_batch_size(small, image, torch.device("meta")) == GPU_EVAL_BATCH
    # Batching changes nothing a model computes per image.
    data = TensorDataset(torch.randn(300, 3, 32, 32), torch.randint(0, 10, (300,)))
    assert torch.equal(predict(model, data)[0], predict(model, data, batch_size=300)[0])


@pytest.mark.slow
def test_fine_tunes_a_compressed_model_and_keeps_weights_on_grid(tiny: nn.Module) -> None:
    from edgeopt.spaces.apply import apply_plan
    from edgeopt.spaces.quantize import CompressedMixin
    from edgeopt.spaces.space import SearchSpace

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    space = SearchSpace.from_model(tiny, x[:1])
    compressed = apply_plan(tiny, space.uniform(w_bits=4, a_bits=8), x[:1], calib_data=[x[:32]])
    before = [m.weight.detach().clone() for m in compressed.modules() if isinstance(m, CompressedMixin)]
    train(compressed, TensorDataset(x, y), epochs=2, lr=0.01, batch_size=16, teacher=tiny)
    layers = [m for m in compressed.modules() if isinstance(m, CompressedMixin)]
    assert any(not torch.equal(b, m.weight) for b, m in zip(before, layers))  # it did learn
    for layer in layers:  # and eval() snapped every weight back onto its 4-bit grid
        q = layer.weight / layer.weight_scale().view(-1, *([1] * (layer.weight.dim() - 1)))
        assert torch.allclose(q, q.round(), atol=1e-3)
        assert q.abs().max() <= 7 + 1e-3


def test_random_affine() -> None:
    x = torch.zeros(4, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    assert torch.allclose(random_affine(x, degrees=0, scale=0, pixels=0), x, atol=1e-6)
    torch.manual_seed(0)
    moved = random_affine(x, degrees=0, scale=0, pixels=3)
    assert moved.shape == x.shape
    assert not torch.allclose(moved, x)
    assert torch.allclose(moved.sum((1, 2, 3)), torch.ones(4), atol=0.05)  # shifted, not lost


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_with_autocast() -> None:
    model = _mlp()
    teacher = _mlp(seed=1)
    stats = train(model, _blobs(), epochs=5, lr=0.01, batch_size=32, teacher=teacher, distill_weight=0.3)
    assert stats.device == "cuda" and stats.amp in ("bfloat16", "float16")
    assert next(model.parameters()).device.type == "cpu"  # back where it came from
    assert next(teacher.parameters()).device.type == "cpu"
    assert evaluate(model, _blobs(seed=1)) > 95


def test_a_checkpointed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch) -> None:
    import edgeopt.search.training as training

    noisy = lambda x: x + 0.1 * torch.randn_like(x)  # noqa: E731 -- the resumed run must restore the RNG
    settings = dict(epochs=3, lr=0.01, batch_size=32, seed=3, augment=noisy)
    whole = _mlp()
    whole_stats = train(whole, _blobs(), **settings)

    real_batches = training.batches

    def crash_in_third_epoch(dataset, batch_size, **kwargs):
        if kwargs["seed"] == 3 * 100_003 + 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a killed job, after two whole epochs
        return real_batches(dataset, batch_size, **kwargs)

    checkpoint = tmp_path / "train.ckpt"
    monkeypatch.setattr(training, "batches", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_mlp(), _blobs(), checkpoint=checkpoint, **settings)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(training, "batches", real_batches)

    resumed = _mlp(seed=7)  # other initial weights: the checkpoint's must replace them
    resumed_stats = train(resumed, _blobs(), checkpoint=checkpoint, **settings)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert resumed_stats.steps == whole_stats.steps
    assert resumed_stats.epoch_losses == whole_stats.epoch_losses
    assert resumed_stats.first_loss == whole_stats.first_loss

    with pytest.raises(EdgeoptError, match="another recipe .*lr"):
        train(_mlp(), _blobs(), checkpoint=checkpoint, **{**settings, "lr": 0.02})
