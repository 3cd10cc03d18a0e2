"""The embedded default data set: ~5000 32x32 RGB images from data that ships inside installed packages.

Nothing is downloaded. Sources (all verified to load offline):

- ``digits``: ``sklearn.datasets.load_digits`` (8x8 grey), upscaled, tinted with a random colour per sample.
- ``faces``: ``skimage.data.lfw_subset`` (25x25 grey; first 100 faces, last 100 non-face background
  patches of the same photos), several jittered crops per source image.
- ``photos``: random crops at random scale from bundled skimage photographs.
- ``textures``: random crops from the bundled brick, grass and gravel textures.
- ``microscopy``: random crops from the bundled immunohistochemistry, cell, retina and microaneurysm images.

Each domain also gets a labelled held-out split (~20 %) that is not in the training shards and shares no
pixels with them: held-out digits are other digit images, held-out faces come from other source images, and
held-out crops of photographs / textures / microscopy come from the bottom 20 % of rows of each source image,
which the training crops never touch. Labels: digit class, face(1)/non-face(0), or source-image id.

Layout under ``<cache>/embedded-v1/``: ``shards/shard-XXXXX.tar`` (+ ``shards/manifest.json``),
``train_images.npz`` (images, index, domain_id), ``heldout.npz`` (``<domain>_x``, ``<domain>_y``),
``manifest.json`` (written last; its presence plus matching shard hashes means the build is complete).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from moce_ds.data.images import png_bytes
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import atomic_write_json, sha256_file, write_shards
from moce_ds.data.splits import stratified_halves

__all__ = [
    "DOMAINS",
    "EMBEDDED_VERSION",
    "IMAGE_SIZE",
    "EmbeddedDataset",
    "TaskSpec",
    "build_embedded_dataset",
    "default_cache_dir",
    "embedded_tasks",
    "load_task",
]

logger = logging.getLogger("moce_ds")

EMBEDDED_VERSION = "v1"
IMAGE_SIZE = 32
DOMAINS = ["digits", "faces", "photos", "textures", "microscopy"]
_HELDOUT_FRACTION = 0.2
_NUM_SHARDS = 8
_FACE_CROPS_PER_SOURCE = 6
# train crops per source image; held-out gets a quarter of that (=> a 20 % held-out share)
_CROPS_PER_SOURCE = {"photos": 125, "textures": 270, "microscopy": 200}
_CROP_FRACTION = {"photos": (0.12, 0.5), "textures": (0.08, 0.35), "microscopy": (0.08, 0.35)}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "moce_ds"


# ----------------------------------------------------------------------------------------------- sources


def _photo_sources() -> list[tuple[str, np.ndarray]]:
    import skimage.data as skd

    return [
        (n, getattr(skd, n)())
        for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "clock")
    ]


def _texture_sources() -> list[tuple[str, np.ndarray]]:
    import skimage.data as skd

    return [(n, getattr(skd, n)()) for n in ("brick", "grass", "gravel")]


def _microscopy_sources() -> list[tuple[str, np.ndarray]]:
    import skimage.data as skd

    retina = skd.retina()
    h = retina.shape[0]
    retina = retina[h // 4 : 3 * h // 4, h // 4 : 3 * h // 4]  # why: drop the black border around the fundus
    return [
        ("immunohistochemistry", skd.immunohistochemistry()),
        ("cell", skd.cell()),
        ("retina", retina),
        ("microaneurysms", skd.microaneurysms()),
    ]


_SOURCES: dict[str, Callable[[], list[tuple[str, np.ndarray]]]] = {
    "photos": _photo_sources,
    "textures": _texture_sources,
    "microscopy": _microscopy_sources,
}


# ----------------------------------------------------------------------------------------------- rendering


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any grey/RGB/RGBA, float [0,1] or uint8 image -> uint8 [H, W, 3]."""
    if img.dtype != np.uint8:
        img = np.clip(np.asarray(img, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _resize(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    # Pillow's bicubic resize antialiases when shrinking, so small crops of big photos do not alias
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def _random_crops(img: np.ndarray, n: int, frac: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """n square crops with side = U(frac) * min(H, W) (clipped to fit), random flip -> uint8 [n, 32, 32, 3]."""
    h, w = img.shape[:2]
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        side = round(rng.uniform(*frac) * min(h, w))
        side = max(8, min(side, h, w))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = _resize(np.ascontiguousarray(crop))
    return out


def _crop_domain(domain: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Crops of source images; train from the top 80 % of rows, held-out from the bottom 20 %."""
    n_train = _CROPS_PER_SOURCE[domain]
    n_held = max(1, n_train // 4)
    tx, ty, hx, hy = [], [], [], []
    for sid, (_, raw) in enumerate(_SOURCES[domain]()):
        img = _to_rgb_uint8(raw)
        cut = round(img.shape[0] * (1 - _HELDOUT_FRACTION))
        tx.append(_random_crops(img[:cut], n_train, _CROP_FRACTION[domain], rng))
        hx.append(_random_crops(img[cut:], n_held, _CROP_FRACTION[domain], rng))
        ty.append(np.full(n_train, sid, np.int64))
        hy.append(np.full(n_held, sid, np.int64))
    return np.concatenate(tx), np.concatenate(ty), np.concatenate(hx), np.concatenate(hy)


def _digits_domain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).astype(np.uint8)  # [N, 8, 8]
    n = imgs.shape[0]
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        grey = np.asarray(Image.fromarray(imgs[i]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
        # a saturated random colour per sample, so the domain is not trivially grey
        tint = rng.uniform(0.3, 1.0, size=3)
        tint[rng.integers(0, 3)] = 1.0
        out[i] = (grey[:, :, None].astype(np.float32) * tint[None, None, :]).astype(np.uint8)
    labels = d.target.astype(np.int64)
    perm = rng.permutation(n)
    n_held = round(n * _HELDOUT_FRACTION)
    held, train = perm[:n_held], perm[n_held:]
    return out[train], labels[train], out[held], labels[held]


def _faces_domain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import skimage.data as skd

    raw = skd.lfw_subset()  # [200, 25, 25] float in [0, 1]; first 100 faces, last 100 non-faces
    labels = np.r_[np.ones(100, np.int64), np.zeros(raw.shape[0] - 100, np.int64)]
    held_src: list[int] = []
    for cls in (1, 0):  # stratified split of *source images*, so held-out faces are unseen people/patches
        members = np.flatnonzero(labels == cls)
        held_src += list(rng.permutation(members)[: round(len(members) * _HELDOUT_FRACTION)])
    held_set = set(held_src)
    tx, ty, hx, hy = [], [], [], []
    for s in range(raw.shape[0]):
        img = _to_rgb_uint8(raw[s])
        crops = np.empty((_FACE_CROPS_PER_SOURCE, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for j in range(_FACE_CROPS_PER_SOURCE):
            side = int(rng.integers(19, 26))
            y, x = (int(v) for v in rng.integers(0, 25 - side + 1, size=2))
            crop = img[y : y + side, x : x + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crops[j] = _resize(np.ascontiguousarray(crop))
        (hx if s in held_set else tx).append(crops)
        (hy if s in held_set else ty).append(np.full(_FACE_CROPS_PER_SOURCE, labels[s], np.int64))
    return np.concatenate(tx), np.concatenate(ty), np.concatenate(hx), np.concatenate(hy)


def _render_domain(domain: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> train_x uint8 [N,32,32,3], train_y int64 [N], held_x uint8 [M,32,32,3], held_y int64 [M]."""
    if domain == "digits":
        return _digits_domain(rng)
    if domain == "faces":
        return _faces_domain(rng)
    return _crop_domain(domain, rng)


# ----------------------------------------------------------------------------------------------- data set


@dataclass
class EmbeddedDataset:
    root: Path
    shard_urls: list[str]
    num_train: int
    domains: list[str]

    def train_images(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> images uint8 [N, 32, 32, 3], global index int64 [N], domain_id int64 [N] (into ``domains``)."""
        with np.load(self.root / "train_images.npz") as z:
            return z["images"], z["index"].astype(np.int64), z["domain_id"].astype(np.int64)

    def heldout(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        """-> images uint8 [N, 32, 32, 3], labels int64 [N] of one domain's held-out split."""
        if domain not in self.domains:
            raise KeyError(f"unknown embedded domain {domain!r}; known: {self.domains}")
        with np.load(self.root / "heldout.npz") as z:
            return z[f"{domain}_x"], z[f"{domain}_y"].astype(np.int64)

    @property
    def manifest(self) -> dict:
        with open(self.root / "manifest.json") as f:
            return json.load(f)


def _load_complete(root: Path) -> EmbeddedDataset | None:
    """Load a finished build, or None if ``root`` is missing or incomplete (a shard missing or altered)."""
    mpath = root / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        with open(mpath) as f:
            m = json.load(f)
        if m.get("version") != EMBEDDED_VERSION:
            return None
        for name in ("train_images.npz", "heldout.npz"):
            if not (root / name).is_file():
                return None
        urls = []
        for s in m["shards"]:
            p = root / "shards" / s["name"]
            if not p.is_file() or sha256_file(p) != s["sha256"]:
                return None
            urls.append(str(p))
    except (OSError, ValueError, KeyError):
        return None
    return EmbeddedDataset(root=root, shard_urls=urls, num_train=int(m["num_train"]), domains=list(m["domains"]))


def build_embedded_dataset(cache_dir: Path | None = None, seed: int = 0) -> EmbeddedDataset:
    """Build (first call) or load (later calls) the embedded data set under ``<cache_dir>/embedded-v1``.

    Deterministic given ``seed``. The build happens in a temp folder that is renamed into place, so an
    interrupted build never looks complete. A cached build made with another seed is an error.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"embedded-{EMBEDDED_VERSION}"
    ds = _load_complete(root)
    if ds is not None:
        built_seed = ds.manifest.get("seed")
        if built_seed != seed:
            raise ValueError(
                f"embedded data set at {root} was built with seed={built_seed}, asked for seed={seed}: "
                f"pass another cache_dir or use seed={built_seed}"
            )
        logger.info("embedded data set: using cached build at %s (%d train images)", root, ds.num_train)
        return ds
    if root.exists():
        broken = cache_dir / f".embedded-{EMBEDDED_VERSION}.broken-{os.getpid()}-{time.time_ns()}"
        logger.warning("embedded data set at %s is incomplete; moving it to %s and rebuilding", root, broken)
        os.rename(root, broken)

    t0 = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".embedded-{EMBEDDED_VERSION}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build_into(tmp, seed, t0)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished first: keep theirs if it is complete
            if _load_complete(root) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ds = _load_complete(root)
    if ds is None:
        raise RuntimeError(f"embedded data set build at {root} did not verify; delete the folder and retry")
    return ds


def _build_into(out: Path, seed: int, t0: float) -> None:
    quiet = not sys.stderr.isatty()
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(DOMAINS) + 1)]
    train_x, train_dom, train_lab = [], [], []
    held: dict[str, np.ndarray] = {}
    per_domain: dict[str, dict] = {}
    for d_id, domain in enumerate(tqdm(DOMAINS, desc="embedded: render", disable=quiet)):
        tx, ty, hx, hy = _render_domain(domain, rngs[d_id])
        train_x.append(tx)
        train_lab.append(ty)
        train_dom.append(np.full(len(tx), d_id, np.int64))
        held[f"{domain}_x"], held[f"{domain}_y"] = hx, hy
        per_domain[domain] = {"train": len(tx), "heldout": len(hx), "num_labels": len(np.unique(hy))}
    x = np.concatenate(train_x)  # [N, 32, 32, 3]
    dom = np.concatenate(train_dom)
    lab = np.concatenate(train_lab)
    # why: shuffle before assigning global indices so every shard mixes all domains
    perm = rngs[-1].permutation(len(x))
    x, dom, lab = x[perm], dom[perm], lab[perm]
    n = len(x)
    index = np.arange(n, dtype=np.int64)

    def samples() -> Iterator[tuple[str, bytes, int | None]]:
        for i in tqdm(range(n), desc="embedded: shards", disable=quiet):
            yield make_key(i, DOMAINS[dom[i]]), png_bytes(x[i]), int(dom[i])

    shard_manifest = write_shards(samples(), out / "shards", prefix="shard", max_per_shard=-(-n // _NUM_SHARDS))
    np.savez(out / "train_images.npz", images=x, index=index, domain_id=dom, label=lab)
    np.savez(out / "heldout.npz", **held)
    manifest = {
        "version": EMBEDDED_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "domains": DOMAINS,
        "num_train": n,
        "per_domain": per_domain,
        "shards": shard_manifest["shards"],
        "shard_cls": "domain id (index into domains)",
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / "manifest.json", manifest)
    logger.info("embedded data set: built %d train images in %.1f s", n, manifest["build_seconds"])


# ----------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domains: tuple[str, ...]
    num_classes: int
    description: str


def embedded_tasks() -> dict[str, TaskSpec]:
    """Downstream tasks defined on the held-out splits."""
    n_tex, n_photo = 3, 8
    return {
        "digits": TaskSpec("digits", ("digits",), 10, "digit class 0-9"),
        "faces": TaskSpec("faces", ("faces",), 2, "face (1) vs non-face background patch (0)"),
        "texture_photo": TaskSpec(
            "texture_photo",
            ("textures", "photos"),
            n_tex + n_photo,
            "which source: texture 0-2 (brick, grass, gravel), photograph 3-10",
        ),
        "microscopy": TaskSpec("microscopy", ("microscopy",), 4, "which microscopy source image"),
    }


def load_task(ds: EmbeddedDataset, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> train_x uint8 [N,32,32,3], train_y int64 [N], test_x, test_y: a deterministic stratified 50/50 split."""
    tasks = embedded_tasks()
    if name not in tasks:
        raise KeyError(f"unknown embedded task {name!r}; known: {sorted(tasks)}")
    xs, ys, offset = [], [], 0
    for domain in tasks[name].domains:
        x, y = ds.heldout(domain)
        xs.append(x)
        ys.append(y + offset)  # why: several domains in one task get disjoint label ranges
        offset += int(y.max()) + 1
    x, y = np.concatenate(xs), np.concatenate(ys)
    tr, te = stratified_halves(y, name)
    return x[tr], y[tr], x[te], y[te]
