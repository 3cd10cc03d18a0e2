"""The one registry of feature sources: what turns images into the global features that clusters are made of.

Every place that featurises images goes through here: the clustering job (``launchers/cluster.py``), the
in-training refresh, task customisation and the run report. A source is described by a JSON-able *spec*, which
every clustering round stores as ``feature_extractor`` in its ``manifest.json``, so any round can featurise new
images exactly as its own images were featurised (:func:`round_extractor`).

Kinds (``--features`` on the command line):

- ``pixel``: :mod:`moce_ds.clustering.pixel_features` (``pixel_features_v1``), when nothing is trained yet;
- ``checkpoint``: one of our runs, checkpoint folders or tag folders (dense, TokenMoE or MoCE; any ep_size):
  the mean of the encoder's patch tokens of the *unmasked* image, L2-normalised, MoE layers dropless
  (:func:`moce_ds.moe.inference_routing`); the spec names the run folder and the tag;
- ``timm``: ``timm:<model name>`` plus a weights file (its sha256 is recorded and checked on rebuild).

**One policy for an image without a cluster id.** A MoCE encoder routes an image by its cluster, so featurising
with one needs the image's id in the round that encoder was trained with (its *routing round*). An image that
has no id there (a task image, a shard added after the round, a sample the round could not decode) is given
the id of its nearest centroid of the routing round, featurised by that round's own source
(:class:`ClusterIds`; recursively, down to a round made from pixels or a dense encoder). The same rule serves the
clustering job, the refresh, customisation and the report. Only the pre-training loader differs: it skips and
counts a sample without an id (``data.strict=true``: an error), because training must route by the id the
sidecar holds, and assigning in loader workers would need the encoder there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from moce_ds.checkpoints.run_reader import load_pretrained, resolve_checkpoint
from moce_ds.clustering.kmeans import assign, unit_rows
from moce_ds.clustering.pixel_features import PIXEL_FEATURES_VERSION, pixel_features
from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from moce_ds.data.sidecar import ClusterRound, list_rounds, load_round_at
from moce_ds.model.device import inference, resolve_device

__all__ = ["FEATURE_KINDS", "ClusterIds", "FeatureExtractor", "FeatureSourceError", "assign_to_round",
           "build_extractor", "checkpoint_spec", "checkpoint_tags_in_use", "encoder_features", "fit_images",
           "make_extractor", "parse_features", "pixel_spec", "round_extractor", "square_image"]

logger = logging.getLogger("moce_ds")

_BATCH = 256  # images per encoder forward when featurising


class FeatureSourceError(ValueError):
    """A feature source cannot be rebuilt (deleted checkpoint, changed weights file, unknown kind)."""


@dataclass
class FeatureExtractor:
    """images uint8 [N, S, S, 3] (+ global indices int64 [N] when known) -> float32 [N, d] unit rows."""

    source: str  # stable id: the round manifest's feature_source and the feature cache's key
    space: str  # rounds of an equal space can be matched by centroid distance
    image_size: int  # images are resized (shorter side) + centre-cropped to this before featurising
    spec: dict  # how to rebuild this extractor: the round manifest's feature_extractor
    fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = field(repr=False)

    def __call__(self, images: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        images = fit_images(images, self.image_size)
        if len(images) <= _BATCH:
            return self.fn(images, index)
        parts = [self.fn(images[i:i + _BATCH], None if index is None else index[i:i + _BATCH])
                 for i in range(0, len(images), _BATCH)]
        return np.concatenate(parts)


def square_image(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop -> uint8 [size, size, 3]."""
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def fit_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, S, S, 3] -> uint8 [N, size, size, 3] (unchanged when S == size)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([square_image(Image.fromarray(im), size) for im in images]) if len(images) else \
        np.zeros((0, size, size, 3), np.uint8)


@torch.no_grad()
def encoder_features(model: torch.nn.Module, images: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
    """MoCE/MAE encoder: images [B, 3, S, S], cluster [B] -> float32 [B, D] mean of unmasked patch tokens, unit norm."""
    latent = model.forward_features(images, cluster)  # [B, 1+L, D]
    feats = latent[:, 1:, :].float().mean(dim=1)  # drop the cls token: the design's "patch tokens"
    return torch.nn.functional.normalize(feats, dim=1)


# ---------------------------------------------------------------------------------------------------- specs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_spec(run_dir: Path, tag: str, model_size: str, image_size: int, routing: str,
                    routing_round: Path | None) -> dict:
    """The spec of one of our checkpoints as a feature source (also written by the in-training refresh)."""
    return {"kind": "checkpoint", "run": str(Path(run_dir).resolve()), "tag": tag, "model_size": model_size,
            "image_size": int(image_size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "routing": routing, "routing_round": None if routing_round is None else str(Path(routing_round).resolve())}


def pixel_spec(image_size: int = 32) -> dict:
    return {"kind": "pixel", "version": PIXEL_FEATURES_VERSION, "image_size": int(image_size)}


def parse_features(features: str, weights: str | None = None, image_size: int = 32) -> dict:
    """A ``--features`` value (``pixel`` | a run / checkpoint folder | ``timm:<name>``) -> its spec."""
    if features in ("pixel", PIXEL_FEATURES_VERSION):
        return pixel_spec(image_size)
    if features.startswith("timm:"):
        name = features[len("timm:"):]
        if weights and not Path(weights).is_file():
            raise FeatureSourceError(f"--weights {weights} does not exist: pass the weights file of timm model {name}.")
        return {"kind": "timm", "name": name, "weights": str(Path(weights).resolve()) if weights else None,
                "sha256": _sha256(Path(weights)) if weights else None}
    if Path(features).exists():
        run_dir, _, tag = resolve_checkpoint(Path(features))
        pre = load_pretrained(Path(features))
        needs_clusters = pre.model.policy.needs_clusters
        rnd = pre.round.path if needs_clusters and pre.round is not None else None
        if needs_clusters and rnd is None:
            raise FeatureSourceError(f"checkpoint {features} routes by cluster but its clustering round was not "
                                     f"found: it is needed to route the images it featurises.")
        return checkpoint_spec(run_dir, tag, pre.cfg.model.size, pre.model.spec.img_size, pre.cfg.moe.routing, rnd)
    raise FeatureSourceError(f"--features {features!r} is neither 'pixel', 'timm:<model name>' nor an existing run "
                             f"or checkpoint folder.")


# ---------------------------------------------------------------------------------------------------- builders


def _pixel(spec: dict) -> FeatureExtractor:
    if spec.get("version", PIXEL_FEATURES_VERSION) != PIXEL_FEATURES_VERSION:
        raise FeatureSourceError(f"pixel features {spec['version']!r} are not {PIXEL_FEATURES_VERSION}, the only "
                                 f"version this moce-ds computes: re-cluster with launchers/cluster.py.")
    return FeatureExtractor(PIXEL_FEATURES_VERSION, PIXEL_FEATURES_VERSION, int(spec.get("image_size", 32)), spec,
                            lambda images, index: pixel_features(images))


def _checkpoint(spec: dict, dev: torch.device) -> FeatureExtractor:
    run, tag = Path(spec["run"]), spec["tag"]
    folder = run / "checkpoints" / tag
    if not (folder / "mp_rank_00_model_states.pt").is_file():
        raise FeatureSourceError(f"the feature source checkpoint {folder} no longer exists")
    routing_round = Path(spec["routing_round"]) if spec.get("routing_round") else None
    if routing_round is not None and not (routing_round / "manifest.json").is_file():
        raise FeatureSourceError(f"the round {routing_round} that the feature source {folder} routes by no "
                                 f"longer exists")
    pre = load_pretrained(run, tag, centroids=routing_round)
    model = pre.model.to(dev)
    ids = ClusterIds(pre.round) if model.policy.needs_clusters else None
    mean, std = tuple(spec.get("mean", IMAGENET_MEAN)), tuple(spec.get("std", IMAGENET_STD))

    def fn(images: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        cluster = None if ids is None else torch.from_numpy(ids(images, index)).to(dev)
        with model.policy.inference(model), inference(dev):
            return encoder_features(model, to_tensor(images, mean, std, device=dev), cluster).float().cpu().numpy()

    source = f"moce_ds:{run.resolve()}@{tag}"
    return FeatureExtractor(source, f"moce_ds:{pre.cfg.model.size}:{model.spec.embed_dim}", model.spec.img_size,
                            spec, fn)


def _timm(spec: dict, dev: torch.device) -> FeatureExtractor:
    import timm

    name, weights = spec["name"], spec.get("weights")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if weights:
        if not Path(weights).is_file():
            raise FeatureSourceError(f"the weights file {weights} of timm model {name} no longer exists")
        if spec.get("sha256") and _sha256(Path(weights)) != spec["sha256"]:
            raise FeatureSourceError(f"the weights file {weights} changed since it was recorded (sha256 "
                                     f"{spec['sha256'][:12]}...)")
        state = load_file(weights) if weights.endswith(".safetensors") else \
            torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise FeatureSourceError(f"weights {weights} do not fit timm model {name}: missing {missing[:4]}")
    else:
        logger.warning("timm:%s without a weights file: features of a randomly initialised model", name)
    model.eval().to(dev)
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    spec = dict(spec, image_size=size, mean=list(mean), std=list(std))

    def fn(images: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        with inference(dev):
            tokens = model.forward_features(to_tensor(images, mean, std, device=dev))
            feats = tokens[:, prefix:, :].mean(1) if tokens.ndim == 3 else tokens.flatten(1)  # CNNs: [B, C] pooled
            return torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy()

    tag = spec["sha256"][:12] if spec.get("sha256") else "random"
    return FeatureExtractor(f"timm:{name}:{tag}", f"timm:{name}", size, spec, fn)


FEATURE_KINDS: dict[str, Callable[[dict, torch.device], FeatureExtractor]] = {
    "pixel": lambda spec, dev: _pixel(spec),  # numpy on the host whatever the device
    "checkpoint": _checkpoint,
    "timm": _timm,
}


@functools.lru_cache(maxsize=16)
def _build_cached(key: str, device: str) -> FeatureExtractor:
    spec = json.loads(key)
    kind = spec.get("kind")
    if kind not in FEATURE_KINDS:
        raise FeatureSourceError(f"feature source kind {kind!r} is unknown; known kinds: {', '.join(FEATURE_KINDS)}.")
    return FEATURE_KINDS[kind](spec, torch.device(device))


def build_extractor(spec: dict, device: str | torch.device | None = None) -> FeatureExtractor:
    """A spec -> its extractor on ``device`` ("cpu" default, "cuda[:N]", "auto"; models are loaded once per process,
    spec and device). The device is not part of the spec: a round made on a GPU is rebuilt on a CPU and back."""
    return _build_cached(json.dumps(spec, sort_keys=True), str(resolve_device(device)))


def make_extractor(features: str, weights: str | None = None, image_size: int = 32,
                   device: str | torch.device | None = None) -> FeatureExtractor:
    """``pixel`` | a run folder / checkpoint folder of ours | ``timm:<name>`` (with ``weights``)."""
    return build_extractor(parse_features(features, weights, image_size), device)


# ---------------------------------------------------------------------------------------------------- rounds


def _legacy_spec(rnd: ClusterRound) -> dict:
    """Rounds written before feature_extractor was recorded: rebuild what their feature_source string names."""
    source = str(rnd.manifest.get("feature_source", ""))
    if source == PIXEL_FEATURES_VERSION:
        return pixel_spec()
    if source.startswith("moce_ds:/") and "@" in source:
        run, tag = source[len("moce_ds:"):].rsplit("@", 1)
        return {"kind": "checkpoint", "run": run, "tag": tag}
    raise FeatureSourceError(f"round {rnd.round} at {rnd.path} records its features only as {source!r}, which "
                             f"cannot be rebuilt")


def _fix_hint(rnd: ClusterRound) -> str:
    return (f"pass --features <run or checkpoint folder of the same encoder> to featurise with it instead, or "
            f"re-cluster with launchers/cluster.py (round {rnd.round} is {rnd.path})")


def round_extractor(rnd: ClusterRound, override: str | None = None,
                    device: str | torch.device | None = None) -> FeatureExtractor:
    """The extractor that made ``rnd``'s features, rebuilt from its manifest (or ``override``, a ``--features``
    value, checked to give features of the centroids' width)."""
    if override is not None:
        ext = make_extractor(override, device=device)
        dim = int(rnd.manifest.get("dim", rnd.centroids().shape[1]))
        probe = ext(np.zeros((1, ext.image_size, ext.image_size, 3), np.uint8))
        if probe.shape[1] != dim:
            raise FeatureSourceError(f"--features {override} gives {probe.shape[1]}-wide features but round "
                                     f"{rnd.round}'s centroids are {dim}-wide: pass the encoder the round was made "
                                     f"with (manifest: {rnd.manifest.get('feature_source')}).")
        logger.warning("featurising for round %d with %s instead of its own source %s", rnd.round, ext.source,
                       rnd.manifest.get("feature_source"))
        return ext
    spec = rnd.manifest.get("feature_extractor")
    try:
        return build_extractor(spec if spec else _legacy_spec(rnd), device)
    except FeatureSourceError as e:
        raise FeatureSourceError(f"{e}: {_fix_hint(rnd)}.") from None


def assign_to_round(rnd: ClusterRound, images: np.ndarray, extractor: FeatureExtractor | None = None,
                    index: np.ndarray | None = None) -> np.ndarray:
    """images uint8 [N, S, S, 3] -> int64 [N] nearest centroid of ``rnd`` in its own feature space."""
    ext = extractor if extractor is not None else round_extractor(rnd)
    feats = ext(images, index)
    centroids = rnd.centroids()
    if feats.shape[1] != centroids.shape[1]:
        raise FeatureSourceError(f"features of width {feats.shape[1]} from {ext.source} do not fit round "
                                 f"{rnd.round}'s {centroids.shape[1]}-wide centroids: {_fix_hint(rnd)}.")
    spherical = bool(rnd.manifest.get("spherical", False))
    if spherical:  # assign() takes rows and centroids as unit norm
        feats, centroids = unit_rows(feats), unit_rows(centroids)
    nearest, _ = assign(feats, centroids, spherical=spherical)
    return nearest.astype(np.int64)


class ClusterIds:
    """The cluster id of each image in one round: from its sidecar by global index, else its nearest centroid.

    See the module docstring: an image without an id (no index, an index past the table, or -1) is assigned to
    the round's nearest centroid, featurised by the round's own source, built only when first needed.
    """

    def __init__(self, rnd: ClusterRound) -> None:
        self.round = rnd
        self.table = np.asarray(rnd.ids(mmap=True))  # int32 [num_images]
        self.assigned = 0  # images that had no id and were assigned to a centroid

    def __call__(self, images: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """images uint8 [N, S, S, 3], index int64 [N] or None -> int64 [N] in [0, k)."""
        n = len(images)
        out = np.full(n, -1, np.int64)
        if index is not None and self.table.size:
            index = np.asarray(index, np.int64)
            inside = (index >= 0) & (index < self.table.shape[0])
            out[inside] = self.table[index[inside]]
        missing = np.flatnonzero(out < 0)
        if missing.size:
            out[missing] = assign_to_round(self.round, images[missing])
            self.assigned += int(missing.size)
        return out


def checkpoint_tags_in_use(clusters_root: Path | None, run_dir: Path) -> set[str]:
    """Tags of ``run_dir`` that a round under ``clusters_root`` names as its feature source (never prune them)."""
    if clusters_root is None or not Path(clusters_root).is_dir():
        return set()
    run = str(Path(run_dir).resolve())
    tags = set()
    for path in list_rounds(clusters_root):
        try:
            spec = load_round_at(path).manifest.get("feature_extractor") or {}
        except (ValueError, KeyError):  # why: an unreadable round must not stop a checkpoint save
            continue
        if spec.get("kind") == "checkpoint" and spec.get("run") == run:
            tags.add(spec["tag"])
    return tags

