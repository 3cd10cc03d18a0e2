"""ImageFolder tree (ImageNet's train layout included) or the embedded set -> WebDataset shards + manifest.

Output under ``out_dir``::

    shard-00000.tar ...        members <key>.jpg|png (+ <key>.cls); key = make_key(global index, key_prefix)
    manifest.json              written last, atomically: shards (name, num_samples, sha256, size_bytes, first/last
                               index, num_corrupt), total, num_indices, num_corrupt (+ examples), classes, source
    .done/shard-00000.json     per-shard done-record: what the shard was written from, its size and sha256

The global index of an image is its position in the sorted listing (class folders, then files, both sorted), so
keys are stable across reruns and machines, and a corrupt image keeps its index (nothing shifts; the cluster-id
table simply has no entry for it). Each worker process writes whole shards into a temp file that is renamed into
place and then recorded as done; a rerun skips shards whose file and done-record match what it would write, and
replaces half-written temp files. Corrupt images are reported, skipped and counted; they never stop the run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from moce_ds.data.images import IMAGE_EXTS, is_image_file, png_bytes
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import add_member, atomic_write_json, sha256_file

__all__ = ["list_image_folder", "make_shards"]

logger = logging.getLogger("moce_ds")

MANIFEST_VERSION = 1
_ENCODINGS = ("keep", "jpg", "png")
_MAX_CORRUPT_EXAMPLES = 100


@dataclass(frozen=True)
class _Item:
    index: int  # global image index (goes into the key)
    src: str  # path relative to the source root, or "embedded:<row>"
    label: int | None
    domain: str  # key prefix


@dataclass(frozen=True)
class _Options:
    encode: str
    quality: int
    resize: int
    root: str  # ImageFolder root, or the embedded set's train_images.npz


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int | None]]]:
    """-> (classes, [(path relative to root, label)]) in a stable order.

    With class sub-folders (ImageFolder / ImageNet train layout) every image below ``root/<class>/`` gets that
    class's index in the sorted class list; with images directly in ``root`` and no sub-folders, no labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")

    def images_below(d: Path) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            out += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                    if is_image_file(Path(f)) and not f.startswith(".")]
        return out

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, c) for c, name in enumerate(classes) for f in images_below(root / name)]
    else:
        files = [(f, None) for f in images_below(root)]
    if not files:
        raise ValueError(f"no images ({', '.join('.' + e for e in IMAGE_EXTS)}) found under {root}")
    return classes, files


# ----------------------------------------------------------------------------------------------- worker side

_EMBEDDED_CACHE: dict[str, np.ndarray] = {}


def _source_bytes(item: _Item, opts: _Options) -> bytes:
    if item.src.startswith("embedded:"):
        images = _EMBEDDED_CACHE.get(opts.root)
        if images is None:  # why: one load per worker process, not per shard
            with np.load(opts.root) as z:
                images = _EMBEDDED_CACHE[opts.root] = z["images"]  # uint8 [N, 32, 32, 3]
        return png_bytes(images[int(item.src.split(":", 1)[1])])
    with open(os.path.join(opts.root, item.src), "rb") as f:
        return f.read()


def _encode(data: bytes, opts: _Options) -> tuple[str, bytes]:
    """Check that ``data`` decodes fully; -> (extension, bytes to store). Raises on a corrupt image."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        if fmt == "JPEG" and opts.encode == "keep" and not opts.resize:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # why: DCT-scaled decode, still
            im.load()  # reads every byte, so a truncated or corrupt JPEG fails here at 1/8 of the cost
            return "jpg", data  # the stored bytes, untouched: no generation loss, no encode cost
        im.load()
        if opts.encode == "keep" and fmt == "PNG" and not opts.resize:
            return "png", data
        img = im.convert("RGB")
    if opts.resize and min(img.size) > opts.resize:  # shorter side down to ``resize``
        s = opts.resize / min(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)
    if opts.encode == "jpg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.quality)
        return "jpg", buf.getvalue()
    return "png", png_bytes(img)  # "png", or "keep" for formats other than JPEG/PNG (lossless)


def _write_shard(task: tuple[str, str, list[_Item], _Options, str]) -> dict:
    """Write one whole shard (runs in a worker process) -> its done-record."""
    name, out_dir, items, opts, fingerprint = task
    final = Path(out_dir) / name
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    corrupt: list[dict] = []
    n = 0
    try:
        with tarfile.open(tmp, "w") as tar:
            for item in items:
                try:
                    ext, data = _encode(_source_bytes(item, opts), opts)
                except Exception as e:  # noqa: BLE001 - a corrupt source image is reported, never fatal
                    corrupt.append({"index": item.index, "src": item.src, "error": f"{type(e).__name__}: {e}"})
                    continue
                key = make_key(item.index, item.domain)
                add_member(tar, f"{key}.{ext}", data)
                if item.label is not None:
                    add_member(tar, f"{key}.cls", str(item.label).encode())
                n += 1
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {
        "name": name, "num_samples": n, "sha256": sha256_file(final), "size_bytes": final.stat().st_size,
        "first_index": items[0].index, "last_index": items[-1].index, "num_corrupt": len(corrupt),
        "corrupt": corrupt, "fingerprint": fingerprint,
    }
    atomic_write_json(Path(out_dir) / ".done" / f"{name}.json", record)  # written last: the shard is finished
    return record


# ----------------------------------------------------------------------------------------------- planning


def _fingerprint(items: list[_Item], opts: _Options, sizes: list[int]) -> str:
    """What a shard is written from: the items, their source file sizes and the encode options."""
    h = hashlib.sha256()
    h.update(json.dumps([opts.encode, opts.quality, opts.resize]).encode())
    for it, size in zip(items, sizes):
        h.update(f"{it.index}\0{it.src}\0{it.label}\0{it.domain}\0{size}\n".encode())
    return h.hexdigest()


def _finished(out_dir: Path, name: str, fingerprint: str, verify: bool) -> dict | None:
    """The shard's done-record if the shard is on disk and matches it (size; sha256 with ``verify``), else None."""
    try:
        record = json.loads((out_dir / ".done" / f"{name}.json").read_text())
        shard = out_dir / name
        if record.get("fingerprint") != fingerprint or not shard.is_file():
            return None
        if shard.stat().st_size != record["size_bytes"]:
            return None
        if verify and sha256_file(shard) != record["sha256"]:
            return None
        return record
    except (OSError, ValueError, KeyError):
        return None


def _split(n: int, max_per_shard: int | None, num_shards: int | None) -> list[tuple[int, int]]:
    if (max_per_shard is None) == (num_shards is None):
        raise ValueError("give exactly one of max_per_shard and num_shards")
    if max_per_shard is not None:
        if max_per_shard < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        return [(a, min(a + max_per_shard, n)) for a in range(0, n, max_per_shard)]
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must lie in [1, {n}] for {n} images, got {num_shards}")
    return [(i * n // num_shards, (i + 1) * n // num_shards) for i in range(num_shards)]  # sizes differ by <= 1


def _check_out_dir(out_dir: Path, image_folder: Path) -> None:
    """Refuse an output folder equal to or inside the image folder: a rerun would list it as a class of its own
    (the shards are not images, but the folder is) and shift the labels of every class sorted after it."""
    out, src = Path(out_dir).resolve(), Path(image_folder).resolve()
    if out == src or src in out.parents:
        where = "is" if out == src else "lies inside"
        raise ValueError(f"output folder {out} {where} the image folder {src}; a rerun would read it as a class and "
                         f"relabel the classes after it: write the shards outside it, e.g. to "
                         f"{src.parent / (src.name + '-shards')}")


def _embedded_items(cache_dir: Path | None) -> tuple[list[str], list[_Item], str, str]:
    from moce_ds.data.embedded import DOMAINS, build_embedded_dataset

    ds = build_embedded_dataset(cache_dir)
    _, index, domain_id = ds.train_images()
    items = [_Item(int(index[r]), f"embedded:{r}", int(domain_id[r]), DOMAINS[int(domain_id[r])])
             for r in range(len(index))]
    return list(DOMAINS), items, str(ds.root / "train_images.npz"), f"embedded:{ds.root}"


def make_shards(
    out_dir: Path,
    image_folder: Path | None = None,
    embedded: bool = False,
    max_per_shard: int | None = None,
    num_shards: int | None = None,
    workers: int = 1,
    prefix: str = "shard",
    key_prefix: str = "img",
    labels: bool = True,
    encode: str = "keep",
    quality: int = 95,
    resize: int = 0,
    verify: bool = False,
    progress: bool | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Write shards of an ImageFolder tree (``image_folder``) or of the embedded set (``embedded=True``).

    ``max_per_shard`` or ``num_shards`` (exactly one). ``encode``: ``keep`` stores JPEG and PNG bytes as they are
    (other formats become PNG), ``jpg``/``png`` re-encode everything; ``resize`` > 0 scales the shorter side down
    to it (re-encoding). ``labels``: write ``<key>.cls`` (class index; for the embedded set the domain id).
    ``verify``: re-hash finished shards before skipping them. ``progress=None``: a bar only on a terminal.
    Returns the manifest dict (also in ``out_dir/manifest.json``).
    """
    if (image_folder is None) == (not embedded):
        raise ValueError("give exactly one of image_folder and embedded=True")
    if encode not in _ENCODINGS:
        raise ValueError(f"encode must be one of {_ENCODINGS}, got {encode!r}")
    make_key(0, key_prefix)  # validates the prefix before any work
    out_dir = Path(out_dir)
    if embedded:
        classes, items, root, source = _embedded_items(cache_dir)
        sizes = [0] * len(items)
    else:
        image_folder = Path(image_folder).resolve()
        _check_out_dir(out_dir, image_folder)  # before anything is written
        classes, files = list_image_folder(image_folder)
        items = [_Item(i, f, c, key_prefix) for i, (f, c) in enumerate(files)]
        root, source = str(image_folder), str(image_folder)
        sizes = [os.stat(os.path.join(root, it.src)).st_size for it in items]  # part of each shard's fingerprint
    if not labels or not classes:
        items = [_Item(it.index, it.src, None, it.domain) for it in items]
    opts = _Options(encode, quality, resize, root)
    bounds = _split(len(items), max_per_shard, num_shards)
    width = max(5, len(str(len(bounds) - 1)))

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").mkdir(exist_ok=True)
    for stale in out_dir.glob(f".{prefix}-*.tar.tmp-*"):  # half-written by an interrupted run: replaced below
        stale.unlink(missing_ok=True)

    records: dict[str, dict] = {}
    tasks = []
    for i, (a, b) in enumerate(bounds):
        name = f"{prefix}-{i:0{width}d}.tar"
        fp = _fingerprint(items[a:b], opts, sizes[a:b])
        done = _finished(out_dir, name, fp, verify)
        if done is not None:
            records[name] = done
        else:
            tasks.append((name, str(out_dir), items[a:b], opts, fp))
    logger.info("make_shards: %d images -> %d shards in %s (%d already finished, %d to write, %d workers)",
                len(items), len(bounds), out_dir, len(records), len(tasks), workers)

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(items), unit="img", desc="make_shards", disable=not show)
    bar.update(sum(r["num_samples"] + r["num_corrupt"] for r in records.values()))
    for rec in _run(tasks, workers):
        records[rec["name"]] = rec
        bar.update(rec["num_samples"] + rec["num_corrupt"])
        for c in rec["corrupt"]:
            logger.warning("make_shards: skipped corrupt image %s (index %d): %s", c["src"], c["index"], c["error"])
    bar.close()

    shards = [records[f"{prefix}-{i:0{width}d}.tar"] for i in range(len(bounds))]
    corrupt = [c for r in shards for c in r["corrupt"]]
    manifest = {
        "version": MANIFEST_VERSION,
        "prefix": prefix,
        "source": source,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "encode": encode,
        "key_prefix": "embedded domains" if embedded else key_prefix,
        "shards": [{k: r[k] for k in ("name", "num_samples", "sha256", "size_bytes", "first_index", "last_index",
                                      "num_corrupt")} for r in shards],
        "total": sum(r["num_samples"] for r in shards),
        "num_indices": len(items),  # the size of a cluster-id table for this set (indices 0 .. num_indices-1)
        "num_corrupt": len(corrupt),
        "corrupt_examples": corrupt[:_MAX_CORRUPT_EXAMPLES],
    }
    if labels and classes:
        manifest["classes"] = classes
    atomic_write_json(out_dir / "manifest.json", manifest)
    logger.info("make_shards: wrote %d samples in %d shards to %s (%d corrupt images skipped)", manifest["total"],
                len(shards), out_dir, len(corrupt))
    return manifest


def _run(tasks: list, workers: int) -> Iterator[dict]:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield _write_shard(t)
        return
    # "spawn" would re-import torch in every worker; these workers only need PIL, numpy and tarfile
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(_write_shard, tasks)
