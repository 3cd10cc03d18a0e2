"""Downstream task images: an embedded task name, an ImageFolder tree or a folder of WebDataset shards.

Everything becomes uint8 arrays (N, S, S, 3) at one size plus integer labels, split into train and test. An image
that does not decode is left out and named in `TaskData.skipped` (file path, or `shard.tar:key`), never dropped
silently.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir, embedded_tasks, load_task
from moce_ds.data.images import IMAGE_EXTS, decode_image, is_image_file, png_bytes
from moce_ds.data.splits import stratified_halves

__all__ = ["TaskData", "load_task_data"]

log = logging.getLogger("moce_ds")

# what PIL raises for a file it cannot decode (UnidentifiedImageError and truncation are OSErrors; some plugins raise
# SyntaxError or ValueError on a corrupt header)
_UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class TaskData:
    name: str
    train_x: np.ndarray  # (N, S, S, 3) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # undecodable images left out: file paths or "shard.tar:key"

    @property
    def all_images(self) -> np.ndarray:
        return np.concatenate([self.train_x, self.test_x])


def _load_image(path_or_bytes, size: int) -> np.ndarray:
    img = decode_image(path_or_bytes)
    if img.size != (size, size):
        # centre crop to a square, then resize: the same geometry a ViT's eval transform uses
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                                Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _split(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    """The embedded tasks' split (``data.splits.stratified_halves``), so one rule holds for every task."""
    tr, te = stratified_halves(y, name)
    return x[tr], y[tr], x[te], y[te]


def _decode_all(named: list[tuple[str, Path | bytes, int]], size: int,
                where: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(name, path or bytes, label) -> images (N, S, S, 3), labels (N,) and the names of those that did not decode."""
    xs, ys, skipped = [], [], []
    for name, src, label in named:
        try:
            xs.append(_load_image(src, size))
            ys.append(label)
        except _UNDECODABLE:
            skipped.append(name)
    if skipped:
        log.warning("%d task image(s) under %s do not decode and are left out: %s%s", len(skipped), where,
                    ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    if not xs:
        raise ValueError(f"no readable images under {where} ({len(skipped)} did not decode): expected "
                         f"<class>/<image> files or shards with image + 'cls' samples.")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), skipped


def _image_folder(root: Path, size: int) -> TaskData:
    def read(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        files = [(str(f), f, ci) for ci, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                 if is_image_file(f)]
        return _decode_all(files, size, folder)

    if (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()):
        test_dir = root / "val" if (root / "val").is_dir() else root / "test"
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        tx, ty, t_skipped = read(root / "train", classes)
        vx, vy, v_skipped = read(test_dir, classes)
        return TaskData(root.name, tx, ty, vx, vy, classes, t_skipped + v_skipped)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} is neither an ImageFolder tree (class subfolders) nor a shard folder.")
    x, y, skipped = read(root, classes)
    return TaskData(root.name, *_split(x, y, root.name), classes, skipped)


def _shards(root: Path, size: int) -> TaskData:
    images: dict[str, tuple[str, bytes]] = {}  # key -> (shard file name, encoded image)
    labels: dict[str, int] = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext in IMAGE_EXTS:
                    images[key] = (shard.name, data)
                elif ext == "cls":
                    labels[key] = int(data.decode().strip())
    keys = sorted(k for k in images if k in labels)
    if not keys:
        raise ValueError(f"shards in {root} have no samples with both an image and a 'cls' label.")
    x, y, skipped = _decode_all([(f"{images[k][0]}:{k}", images[k][1], labels[k]) for k in keys], size, root)
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return TaskData(root.name, *_split(x, y, root.name), classes, skipped)


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

