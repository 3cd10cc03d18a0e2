"""Downstream task images: an embedded task name, an ImageFolder tree or a folder of WebDataset shards.

Everything becomes uint8 arrays (N, S, S, 3) at one size plus integer labels, split into train and test.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir, embedded_tasks, load_task, png_bytes

__all__ = ["TaskData", "load_task_data"]

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class TaskData:
    name: str
    train_x: np.ndarray  # (N, S, S, 3) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    @property
    def all_images(self) -> np.ndarray:
        return np.concatenate([self.train_x, self.test_x])


def _load_image(path_or_bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)
    img = img.convert("RGB")
    if img.size != (size, size):
        # centre crop to a square, then resize: the same geometry a ViT's eval transform uses
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                                Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _split(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    """Deterministic stratified 50/50 split (seeded by the task name)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    train = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        train[idx[: (len(idx) + 1) // 2]] = True
    return x[train], y[train], x[~train], y[~train]


def _image_folder(root: Path, size: int) -> TaskData:
    def read(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((folder / c).iterdir()):
                if f.suffix.lower() in _IMAGE_EXTS:
                    try:
                        xs.append(_load_image(f, size))
                        ys.append(ci)
                    except OSError:
                        continue  # an unreadable image is left out, not a crash
        if not xs:
            raise ValueError(f"no readable images under {folder} (expected <class>/<image> files).")
        return np.stack(xs), np.asarray(ys, dtype=np.int64)

    if (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()):
        test_dir = root / "val" if (root / "val").is_dir() else root / "test"
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        tx, ty = read(root / "train", classes)
        vx, vy = read(test_dir, classes)
        return TaskData(root.name, tx, ty, vx, vy, classes)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} is neither an ImageFolder tree (class subfolders) nor a shard folder.")
    x, y = read(root, classes)
    return TaskData(root.name, *_split(x, y, root.name), classes)


def _shards(root: Path, size: int) -> TaskData:
    images: dict[str, bytes] = {}
    labels: dict[str, int] = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext in ("png", "jpg", "jpeg"):
                    images[key] = data
                elif ext == "cls":
                    labels[key] = int(data.decode().strip())
    keys = sorted(k for k in images if k in labels)
    if not keys:
        raise ValueError(f"shards in {root} have no samples with both an image and a 'cls' label.")
    x = np.stack([_load_image(images[k], size) for k in keys])
    y = np.asarray([labels[k] for k in keys], dtype=np.int64)
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return TaskData(root.name, *_split(x, y, root.name), classes)


def load_task_data(task: str, image_size: int, cache_dir: Path | None = None) -> TaskData:
    """`task`: an embedded task name (see embedded_tasks()), an ImageFolder folder or a shard folder."""
    tasks = embedded_tasks()
    if task in tasks:
        ds = build_embedded_dataset(cache_dir or default_cache_dir())
        tx, ty, vx, vy = load_task(ds, task)
        if tx.shape[1] != image_size:
            resize = lambda a: np.stack([_load_image(png_bytes(i), image_size) for i in a])  # noqa: E731
            tx, vx = resize(tx), resize(vx)
        classes = [str(c) for c in range(tasks[task].num_classes)]
        return TaskData(task, tx, ty, vx, vy, classes)
    root = Path(task)
    if not root.is_dir():
        raise ValueError(f"task '{task}' is neither an embedded task ({', '.join(tasks)}) nor a folder.")
    return _shards(root, image_size) if any(root.glob("*.tar")) else _image_folder(root, image_size)

