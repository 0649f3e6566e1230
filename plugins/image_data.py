"""Image datasets: scikit-learn's digits, procedurally drawn shapes, any image folder, and
CIFAR-10 from its binary distribution. Every source holds examples [N, C, H, W] as float32
in [-1, 1] with integer class labels (when the data has classes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffbench
from diffbench.data import DataSource
from diffbench.registry import ConfigError, Dataset, Option
from diffbench.samples import to_uint8  # noqa: F401  (the quantisation, re-exported for image plugins)

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_digits(size: int = 8) -> DataSource:
    """The 1797 8×8 UCI digits (pixel values 0..16) scaled to [-1, 1]; bilinearly resized if
    ``size`` != 8. Kept at 8×8 by default: the shipped models train in minutes at that size."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [1797, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return DataSource(name="digits", modality="image", shape=tuple(x.shape[1:]), examples=x, labels=labels,
                      num_classes=10, info={"class_names": [str(i) for i in range(10)]})


def draw_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB images [n, 3, size, size] in [-1, 1] of one filled shape each on a black background:
    class k of SHAPE_CLASSES, uniform random colour (each channel in [0.25, 1]), centre and size.
    Deterministic in (n, size, seed); 5000 images take well under a second."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPE_CLASSES), (n,), generator=g)
    r = size * (0.18 + 0.14 * torch.rand(n, generator=g))  # half-extent of the shape, in pixels
    cx = r + (size - 2 * r) * torch.rand(n, generator=g)
    cy = r + (size - 2 * r) * torch.rand(n, generator=g)
    colour = 0.25 + 0.75 * torch.rand(n, 3, generator=g)
    return render_shapes(labels, r, cx, cy, colour, size), labels


def render_shapes(shape: torch.Tensor, r: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, colour: torch.Tensor,
                  size: int) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: shape[i] (an index into SHAPE_CLASSES) of half-extent r[i] pixels
    centred at (cx[i], cy[i]), filled with colour[i] (RGB in [0, 1]) on black."""
    n = len(shape)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None]  # [n, 1, W]
    dy = coords[None, :, None] - cy[:, None, None]  # [n, H, 1]
    r_ = r[:, None, None]
    masks = torch.stack([
        dx**2 + dy**2 <= r_**2,  # circle
        torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r_,  # square
        (dy <= 0.8 * r_) & (dx.abs() <= 0.58 * (dy + r_)),  # triangle, apex up
        ((dx.abs() <= r_ / 3) & (dy.abs() <= r_)) | ((dy.abs() <= r_ / 3) & (dx.abs() <= r_)),  # cross
    ], dim=1)  # [n, 4, H, W]
    mask = masks[torch.arange(n), shape].float()  # [n, H, W]
    images = mask[:, None] * colour[:, :, None, None]  # [n, 3, H, W] in [0, 1]
    return images * 2 - 1


def load_shapes(num: int = 5000, size: int = 32, seed: int = 0) -> DataSource:
    x, labels = draw_shapes(num, size, seed)
    return DataSource(name="shapes", modality="image", shape=(3, size, size), examples=x, labels=labels,
                      num_classes=len(SHAPE_CLASSES), info={"class_names": list(SHAPE_CLASSES)})


def _resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> float [C, size, size]: centre crop to a square, then antialiased resize."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side].float()[None]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _read_image(path: Path, channels: int) -> torch.Tensor:
    """uint8 [C, H, W] through Pillow (torchvision's image decoding is deprecated since 0.29)."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def _image_files(path: str) -> tuple[Path, list[Path]]:
    """The folder and every image file under it (recursively); ConfigError when there is none."""
    if not path:
        raise ConfigError("dataset 'image-folder' needs option 'path' (e.g. image-folder[path=/data/imgs])")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"image-folder: option 'path' = {path!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"image-folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return root, files


def validate_image_folder(path: str = "", **_) -> None:
    """Every image under ``path`` decodes (Pillow's verify reads the file without decoding pixels)."""
    from PIL import Image

    for file in _image_files(path)[1]:
        try:
            with Image.open(file) as img:
                img.verify()
        except Exception as exc:
            raise ConfigError(f"image-folder: {file} is not a readable image ({type(exc).__name__}: {exc})") from None


def load_image_folder(path: str = "", size: int = 32, channels: int = 3) -> DataSource:
    """Every image under ``path`` (recursively). If images sit in subfolders, each subfolder is a
    class (sorted names); otherwise the set is unlabelled."""
    root, files = _image_files(path)
    class_names = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    labelled = bool(class_names) and all(p.parent != root for p in files)
    images = torch.stack([_resize_square(_read_image(p, channels), size) for p in files])
    x = (images / 127.5 - 1).clamp(-1, 1)
    labels = (torch.tensor([class_names.index(p.relative_to(root).parts[0]) for p in files]) if labelled else None)
    return DataSource(name="image-folder", modality="image", shape=tuple(x.shape[1:]), examples=x, labels=labels,
                      num_classes=len(class_names) if labelled else 0,
                      info={"path": str(root), "class_names": class_names if labelled else []})


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR10_RECORD = 3073  # 1 label byte + 3 × 32 × 32 pixel bytes


def read_cifar10_bin(file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One file of the CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes
    (1024 red, 1024 green, 1024 blue, row-major 32×32). Returns (uint8 [n, 3, 32, 32], labels [n])."""
    raw = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8)
    if raw.numel() % CIFAR10_RECORD:
        raise ConfigError(f"cifar10: {file} is not in the CIFAR-10 binary format (size {raw.numel()} bytes)")
    records = raw.view(-1, CIFAR10_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).clone(), records[:, 0].long()


def _cifar10_files(path: str, split: str) -> list[Path]:
    if not path:
        raise ConfigError("dataset 'cifar10' needs option 'path': the 'cifar-10-batches-bin' directory "
                          "(binary version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    files = [Path(path).expanduser() / name for name in CIFAR10_FILES[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"cifar10: option 'path' = {path!r} lacks {', '.join(missing)}")
    return files


def validate_cifar10(path: str = "", split: str = "train", **_) -> None:
    """The split's files exist and hold whole records (a truncated download is named)."""
    for file in _cifar10_files(path, split):
        size = file.stat().st_size
        if size == 0 or size % CIFAR10_RECORD:
            raise ConfigError(f"cifar10: {file} is truncated or not in the CIFAR-10 binary format ({size} bytes, "
                              f"not a multiple of {CIFAR10_RECORD})")


def load_cifar10(path: str = "", split: str = "train", limit: int = 0) -> DataSource:
    """CIFAR-10 from ``cifar-10-batches-bin`` (data_batch_1..5.bin = train, test_batch.bin = test)."""
    parts = [read_cifar10_bin(f) for f in _cifar10_files(path, split)]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if limit:
        images, labels = images[:limit], labels[:limit]
    return DataSource(name="cifar10", modality="image", shape=(3, 32, 32), examples=images.float() / 127.5 - 1,
                      labels=labels, num_classes=10, info={"class_names": list(CIFAR10_CLASSES)})


@diffbench.hookimpl
def register_datasets(register):
    register(Dataset(name="digits", family="image", load=load_digits, options={"size": Option(8, min=1)},
                     description="scikit-learn digits: 1797 8×8 grey images, 10 classes, in [-1, 1]"))
    register(Dataset(name="shapes", family="image", load=load_shapes, options={"num": Option(5000, min=1), "size": Option(32, min=4), "seed": Option(0, min=0)},
                     description="procedural 32×32 RGB shapes (circle/square/triangle/cross), random colour/position/size"))
    register(Dataset(name="image-folder", family="image", load=load_image_folder, validate=validate_image_folder,
                     options={"path": "", "size": Option(32, min=1), "channels": Option(3, choices=(1, 3))},
                     description="images under a folder (class subfolders optional), centre-cropped and resized"))
    register(Dataset(name="cifar10", family="image", load=load_cifar10, validate=validate_cifar10,
                     options={"path": "", "split": Option("train", choices=tuple(CIFAR10_FILES)), "limit": Option(0, min=0)},
                     description="CIFAR-10 from the binary 'cifar-10-batches-bin' directory (option path)"))
