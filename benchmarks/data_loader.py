"""Loader throughput vs training consumption, and the cost of the cluster-id sidecar (issue 3). Never asserts.

    python benchmarks/data_loader.py [--steps 30] [--keys 1000000]

Measured in one run, one process (plus the loader's workers): images/s of the streaming loader on the embedded
set's shards with 0, 1 and 2 workers (default micro-batch of ds_configs/zero2.json, the default model's image
size); images/s of the default model's forward + backward + AdamW step on CPU (no DeepSpeed); the sidecar's
lookup cost per sample (key parse + int32 gather from the memory-mapped table) and its bytes per key at 10^6
synthetic keys. Appends JSON lines to benchmarks/results/data_loader.jsonl and draws data_loader.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moce_ds.config import load_config  # noqa: E402
from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir  # noqa: E402
from moce_ds.data.keys import key_index, make_key  # noqa: E402
from moce_ds.data.loader import make_train_loader  # noqa: E402
from moce_ds.data.sidecar import latest_round  # noqa: E402
from moce_ds.metrics import append_jsonl  # noqa: E402
from moce_ds.model import build_model, get_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def loader_rate(urls: list[str], ids: Path, batch: int, image_size: int, workers: int, steps: int) -> dict:
    loader = make_train_loader(urls, ids, batch_size=batch, steps_per_epoch=steps + 2, image_size=image_size,
                               num_workers=workers, shuffle_buffer=1000)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    next(it)  # why: worker start-up and the shuffle buffer's initial fill are not steady state
    t1 = time.perf_counter()
    n = sum(b["images"].shape[0] for b in it)
    t2 = time.perf_counter()
    return {"images_per_s": n / (t2 - t1), "startup_s": t1 - t0, "images": n}


def train_rate(batch: int, steps: int) -> dict:
    cfg = load_config([], [])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.spec.img_size
    images = torch.randn(batch, 3, size, size)
    clusters = torch.randint(0, cfg.moe.num_clusters, (batch,))
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        out = model(images, clusters)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    return {"images_per_s": batch / float(np.median(times)), "step_s": float(np.median(times)),
            "routing": cfg.moe.routing, "model": cfg.model.size}


def sidecar_cost(num_keys: int, lookups: int) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ids.npy"
        np.save(path, rng.integers(0, 256, num_keys, dtype=np.int32))
        size = os.path.getsize(path)
        ids = np.load(path, mmap_mode="r").view(np.ndarray)  # as the loader's workers open it
        keys = [make_key(int(i), "img") for i in rng.integers(0, num_keys, lookups)]
        t = time.perf_counter()
        s = 0
        for k in keys:  # the per-sample work of the join: parse the index, gather the id
            s += int(ids[key_index(k)])
        per = (time.perf_counter() - t) / lookups
        idx = [key_index(k) for k in keys]
        t = time.perf_counter()
        for i in idx:
            s += int(ids[i])
        gather = (time.perf_counter() - t) / lookups
        arr = np.asarray(idx, dtype=np.int64)
        t = time.perf_counter()
        for a in range(0, lookups, 64):  # per batch of 64, as a trainer-side join by index would do it
            s += int(ids[arr[a : a + 64]].sum())
        batched = (time.perf_counter() - t) / lookups
    return {"num_keys": num_keys, "bytes_per_key": size / num_keys, "file_bytes": size,
            "lookup_us": per * 1e6, "gather_only_us": gather * 1e6,
            "batched_gather_us": batched * 1e6, "checksum": s % 997}


def _photo_jpegs(n: int, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """n JPEGs of ImageNet's typical 500x375 size with photo-like content (smooth fields plus fine noise)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(size, Image.BICUBIC)
        a = np.asarray(base, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def crop_rates(n: int = 300, image_size: int = 224) -> list[dict]:
    """Per-core images/s of one sample's decode + MAE augmentation at ``image_size``: MAE's reference transform
    (PIL decode, bicubic RandomResizedCrop(0.2, 1), flip, ToTensor, Normalize) against this loader's float32,
    uint8 and uint8 + JPEG draft-mode paths (one thread, in process)."""
    import io
    import random

    import torchvision.transforms as T
    from PIL import Image

    from moce_ds.data.images import IMAGENET_MEAN, IMAGENET_STD
    from moce_ds.data.loader import _Process

    jpegs = _photo_jpegs(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def mae(b: bytes):
        with Image.open(io.BytesIO(b)) as im:
            return ref(im.convert("RGB"))

    paths = {"mae_reference": mae}
    for name, u8, draft in (("loader_float32", False, False), ("loader_uint8", True, False),
                            ("loader_uint8_draft", True, True)):
        proc, rng = _Process(None, image_size, False, 0, 0, 0, uint8=u8, draft=draft), random.Random(0)
        paths[name] = lambda b, proc=proc, rng=rng: proc._decode_augment(b, rng)
    out = []
    for name, fn in paths.items():
        fn(jpegs[0])
        t = time.perf_counter()
        for b in jpegs:
            fn(b)
        out.append({"path": name, "images_per_s_per_core": n / (time.perf_counter() - t), "images": n,
                    "image_size": image_size, "source": "500x375 JPEG q90"})
    torch.set_num_threads(threads)
    base = out[0]["images_per_s_per_core"]
    for r in out:
        r["vs_mae_reference"] = r["images_per_s_per_core"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed loader batches per worker setting")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--lookups", type=int, default=200_000)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--crop-images", type=int, default=300, help="JPEGs timed per decode + crop path (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batch = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["train_micro_batch_size_per_gpu"]
    image_size = get_spec(load_config([], []).model.size).img_size
    ds = build_embedded_dataset(args.cache_dir)
    rnd = latest_round(ds.root / "clusters")
    ids_path = None if rnd is None else rnd.path / "ids.npy"
    run = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "batch": batch, "image_size": image_size}
    records = []
    train = train_rate(batch, args.train_steps)
    records.append(dict(run, kind="train_step", **train))
    for w in (0, 1, 2):
        r = loader_rate(ds.shard_urls, ids_path, batch, image_size, w, args.steps)
        r["ratio_to_training"] = r["images_per_s"] / train["images_per_s"]
        records.append(dict(run, kind="loader", workers=w, **r))
    records.append(dict(run, kind="sidecar", **sidecar_cost(args.keys, args.lookups)))
    if args.crop_images:
        records += [dict(run, kind="crop", **r) for r in crop_rates(args.crop_images)]
    append_jsonl(RESULTS / "data_loader.jsonl", records)
    for r in records:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                          if k not in ("time", "host")}))
    _plot(records, RESULTS / "data_loader.png")
    return 0


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaders = [r for r in records if r["kind"] == "loader"]
    train = next(r for r in records if r["kind"] == "train_step")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([str(r["workers"]) for r in loaders], [r["images_per_s"] for r in loaders], color="tab:blue",
           label="loader")
    ax.axhline(train["images_per_s"], color="tab:red", label="training step consumes")
    ax.axhline(2 * train["images_per_s"], color="tab:red", ls="--", label="2x training (target)")
    ax.set_xlabel("loader workers")
    ax.set_ylabel("images/s")
    ax.set_title(f"embedded set, batch {train['batch']}, {train['image_size']}px, {train['cpus']} CPUs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
