"""A cheap pixel featuriser for the first clustering round, before any encoder is trained.

``pixel_features`` maps uint8 images [N, H, W, 3] to float32 [N, D] rows built from three blocks:

1. **layout**: the image area-downsampled to 8x8 RGB (192 values in [0, 1]), minus its own mean grey level,
   so it encodes spatial colour layout, not brightness;
2. **colour**: a joint 4x4x4 RGB histogram (64 bins), square-rooted (the Hellinger embedding), so the
   Euclidean distance between two rows behaves like a distance between colour distributions;
3. **texture**: gradient-energy statistics of the grey image (mean, std and quantiles of the gradient
   magnitude, share of edge pixels at two thresholds, a magnitude-weighted 8-bin orientation histogram)
   plus saturation and per-channel contrast (26 values).

Each block is standardised *per row* (centred, then scaled to unit L2 norm; the histogram block is already
unit norm), so the three blocks weigh the same whatever their width, and the concatenation is L2-normalised.
Nothing depends on the other images in the batch: the same image always gets the same row, so new images can
be assigned to centroids computed earlier. Rows are unit norm, so Euclidean k-means on them is spherical.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PIXEL_FEATURES_VERSION", "PIXEL_FEATURE_DIM", "pixel_features"]

PIXEL_FEATURES_VERSION = "pixel_features_v1"
_THUMB = 8
_HIST_BINS = 4
PIXEL_FEATURE_DIM = _THUMB * _THUMB * 3 + _HIST_BINS**3 + 26


def _unit_rows(x: np.ndarray, center: bool) -> np.ndarray:
    if center:
        x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _layout_block(img: np.ndarray) -> np.ndarray:
    """img float32 [n, H, W, 3] in [0, 1] -> [n, 192] area-downsampled 8x8 RGB."""
    n, h, w, _ = img.shape
    # crop to a multiple of 8 so the area average is an exact block mean
    hh, ww = h - h % _THUMB, w - w % _THUMB
    x = img[:, :hh, :ww].reshape(n, _THUMB, hh // _THUMB, _THUMB, ww // _THUMB, 3).mean(axis=(2, 4))
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)  # drop brightness, keep layout and colour casts
    return x.reshape(n, -1)


def _colour_block(u8: np.ndarray) -> np.ndarray:
    """u8 [n, H, W, 3] -> [n, 64] sqrt of the normalised joint RGB histogram (unit L2 norm per row)."""
    n = u8.shape[0]
    q = (u8 >> (8 - 2)).astype(np.int64)  # 4 levels per channel
    code = (q[..., 0] * _HIST_BINS + q[..., 1]) * _HIST_BINS + q[..., 2]  # [n, H, W]
    code = code.reshape(n, -1) + np.arange(n)[:, None] * _HIST_BINS**3
    hist = np.bincount(code.ravel(), minlength=n * _HIST_BINS**3).reshape(n, -1).astype(np.float32)
    return np.sqrt(hist / hist.sum(axis=1, keepdims=True))


def _texture_block(img: np.ndarray) -> np.ndarray:
    """img float32 [n, H, W, 3] in [0, 1] -> [n, 26] gradient-energy and colour-contrast statistics."""
    grey = img @ np.array([0.299, 0.587, 0.114], np.float32)  # [n, H, W]
    gx = grey[:, :-1, 1:] - grey[:, :-1, :-1]
    gy = grey[:, 1:, :-1] - grey[:, :-1, :-1]
    mag = np.sqrt(gx**2 + gy**2).reshape(len(img), -1)  # [n, P]
    q = np.quantile(mag, [0.25, 0.5, 0.75, 0.9, 0.99], axis=1).T  # [n, 5]
    edges = np.stack([(mag > 0.05).mean(1), (mag > 0.2).mean(1)], axis=1)
    ang = (np.arctan2(gy, gx).reshape(len(img), -1) + np.pi) / (2 * np.pi)  # [0, 1]
    bins = np.minimum((ang * 8).astype(np.int64), 7) + np.arange(len(img))[:, None] * 8
    orient = np.bincount(bins.ravel(), weights=mag.ravel(), minlength=len(img) * 8).reshape(len(img), 8)
    orient = orient / np.maximum(orient.sum(1, keepdims=True), 1e-6)
    flat = img.reshape(len(img), -1, 3)
    sat = flat.max(2) - flat.min(2)  # [n, P]
    colour = np.concatenate(
        [sat.mean(1, keepdims=True), sat.std(1, keepdims=True), flat.std(1), flat.mean(1), grey.std((1, 2))[:, None]],
        axis=1,
    )  # [n, 9]
    stats = np.concatenate([mag.mean(1, keepdims=True), mag.std(1, keepdims=True), q, edges, orient, colour], axis=1)
    # why sqrt: compresses the heavy right tail of gradient energy so one busy image does not dominate
    return np.sqrt(np.maximum(stats, 0.0)).astype(np.float32)


def pixel_features(images: np.ndarray, batch: int = 2048) -> np.ndarray:
    """uint8 [N, H, W, 3] (H, W >= 8) -> float32 [N, PIXEL_FEATURE_DIM] unit-norm rows; see the module doc."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"pixel_features expects uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if min(images.shape[1:3]) < _THUMB:
        raise ValueError(f"pixel_features needs images of at least {_THUMB}x{_THUMB}, got {images.shape[1:3]}")
    out = np.empty((images.shape[0], PIXEL_FEATURE_DIM), np.float32)
    for s in range(0, images.shape[0], batch):  # why: bounds memory for large N
        u8 = images[s : s + batch]
        img = u8.astype(np.float32) / 255.0
        blocks = [
            _unit_rows(_layout_block(img), center=True),
            _colour_block(u8),
            _unit_rows(_texture_block(img), center=True),
        ]
        out[s : s + batch] = _unit_rows(np.concatenate(blocks, axis=1), center=False)
    return out
