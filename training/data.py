"""Data: one decode of the whole data set into uint8 tensors (with core.preprocess, as the service does).

Accepted sources (``--data PATH``):
  * the shipped tarball ``cifar10-jpeg.tar.gz`` (``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` inside);
  * an ImageFolder root directory with ``train/`` and ``test/`` sub-folders (any image Pillow reads);
  * a torchvision ``CIFAR10`` root (the folder holding ``cifar-10-batches-py/``, or that folder itself).

Decoding 60,000 JPEGs takes a while, so the decoded tensors are cached (safetensors, keyed by a
fingerprint of the source) and every later run starts in a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.preprocess import IMAGE_SIZE, normalize, preprocess, to_rgb, upright  # noqa: F401 - re-exported

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
EXPECTED_LAYOUTS = (
    "expected one of:\n"
    "  * a .tar.gz holding train/<class>/<image> and test/<class>/<image> (e.g. cifar10-jpeg.tar.gz)\n"
    "  * an ImageFolder root directory with train/<class>/<image> and test/<class>/<image>\n"
    "  * a torchvision CIFAR10 root (containing cifar-10-batches-py/ with data_batch_1..5 and test_batch)"
)


class DataError(ValueError):
    """The data set is missing or malformed; the message says what was expected."""


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale (computed on the training split)."""
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    train_images: Tensor  # uint8 [N, 3, 32, 32]
    train_labels: Tensor  # int64 [N]
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    source: str
    sha256: str  # of the tarball when the source is one, else of the decoded tensors

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "classes": self.classes,
                "train_images": len(self.train_labels), "test_images": len(self.test_labels)}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _decode(data: bytes, name: str) -> Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return preprocess(image)
    except Exception as exc:  # Pillow raises many types for bad files
        raise DataError(f"cannot decode image {name!r}: {exc}") from exc


def _collect(samples: dict[str, list[tuple[str, bytes]]], split: str, origin: str) -> tuple[Tensor, Tensor, list[str]]:
    classes = sorted(samples)
    if len(classes) < 2:
        raise DataError(f"{origin}: {split}/ has {len(classes)} class folder(s) with images; {EXPECTED_LAYOUTS}")
    images, labels = [], []
    for index, cls in enumerate(classes):
        for name, data in sorted(samples[cls]):
            images.append(_decode(data, name))
            labels.append(index)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes


def _split_of(parts: list[str]) -> tuple[str, str] | None:
    """('train'|'test', class) for .../train/<class>/<file>, else None."""
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    return None


def _load_tarball(path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    splits: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                where = _split_of(member.name.split("/"))
                if where is None:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    splits[where[0]].setdefault(where[1], []).append((member.name, handle.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}); {EXPECTED_LAYOUTS}") from exc
    return _assemble(splits, str(path))


def _load_image_folder(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    splits: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for split in splits:
        split_dir = root / split
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                splits[split][class_dir.name] = [(str(p), p.read_bytes()) for p in files]
    return _assemble(splits, str(root))


def _assemble(splits: dict, origin: str) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    for split in ("train", "test"):
        if not splits[split]:
            raise DataError(f"{origin}: no images found under {split}/<class>/; {EXPECTED_LAYOUTS}")
    train_x, train_y, classes = _collect(splits["train"], "train", origin)
    test_x, test_y, test_classes = _collect(splits["test"], "test", origin)
    if test_classes != classes:
        raise DataError(f"{origin}: train/ and test/ have different class folders: {classes} vs {test_classes}")
    return train_x, train_y, test_x, test_y, classes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays. Allow exactly the classes
    needed to rebuild those and nothing else, so a hostile file cannot execute code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")
        return super().find_class(module, name)


def _load_cifar_batches(folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    def read(name: str) -> tuple[Tensor, Tensor]:
        try:
            with open(folder / name, "rb") as f:
                batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            images = torch.as_tensor(batch["data"], dtype=torch.uint8).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
            return images, torch.as_tensor(batch["labels"], dtype=torch.int64)
        except (OSError, KeyError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"{folder / name}: not a CIFAR-10 python batch ({exc}); {EXPECTED_LAYOUTS}") from exc

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    return train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES)


def _fingerprint(path: Path) -> str:
    """Cheap identity of a source for the cache key: path, sizes and mtimes of its files."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        stat = p.stat()
        digest.update(f"{p}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _tensor_sha256(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRUNE_CACHE_DIR", Path.home() / ".cache" / "gated-prune"))


def load_dataset(path: str | Path, cache_dir: str | Path | None = None) -> Dataset:
    """Load (and cache) a data set from any accepted source; DataError with the expected layouts otherwise."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"data path {source} does not exist; {EXPECTED_LAYOUTS}")

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"dataset-{_fingerprint(source)}.safetensors"
    if cache_file.exists():
        try:
            tensors = load_file(str(cache_file))
            meta = _read_meta(cache_file)
            return Dataset(tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                           tensors["test_labels"], meta["classes"].split("\n"), str(source), meta["sha256"])
        except Exception:  # a broken cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)

    if source.is_file():
        loaded = _load_tarball(source)
        sha = sha256_file(source)
    elif (source / "cifar-10-batches-py").is_dir() or (source / "data_batch_1").is_file():
        folder = source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source
        loaded = _load_cifar_batches(folder)
        sha = _tensor_sha256(*loaded[:4])
    elif (source / "train").is_dir() and (source / "test").is_dir():
        loaded = _load_image_folder(source)
        sha = _tensor_sha256(*loaded[:4])
    else:
        raise DataError(f"{source}: unrecognised data set layout; {EXPECTED_LAYOUTS}")

    train_x, train_y, test_x, test_y, classes = loaded
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y},
                  str(tmp), metadata={"classes": "\n".join(classes), "sha256": sha})
        tmp.replace(cache_file)  # atomic: a crash never leaves a half-written cache
    except OSError:
        pass  # an unwritable cache only costs time
    return Dataset(train_x, train_y, test_x, test_y, classes, str(source), sha)


def _read_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def split_validation(labels: Tensor, val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, val): a stratified, seeded hold-out carved from the training split."""
    if val_size <= 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = val_size // len(classes)
    val = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        val.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx
