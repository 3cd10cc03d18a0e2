"""One image decoder, one PNG encoder, one set of image extensions and the normalisation constants, shared by the
training loader, the clustering features, the customisation task data, the embedded set and make_shards (they had
three decoders, two PNG encoders and four extension sets).

Images travel as uint8 everywhere on the host (HWC arrays or (N, 3, H, W) tensors); they become float only on the
device that uses them (:func:`normalize`, called by the model), so loader workers send 4x fewer bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "decode_image", "image_member", "is_image_file",
           "normalize", "png_bytes", "to_uint8_chw"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# webdataset member names and file suffixes (without the dot) that hold an image, in the order a sample is searched;
# make_shards stores the last four as PNG, but an image folder may hold them, so every reader accepts them too
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "ppm")


def image_member(sample: dict) -> bytes | None:
    """The encoded image of a webdataset sample (its first member named by :data:`IMAGE_EXTS`), or None."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS


def decode_image(data: bytes | str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Encoded bytes (or a file) -> RGB PIL image, fully decoded (a truncated file raises here, not later).

    ``draft`` (w, h): let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding, to the smallest size that
    is still at least (w, h) (PIL's draft mode; other formats ignore it): a 224 px crop of a large photo then costs
    a fraction of the full decode. Raises whatever the decoder raises for a bad image."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if draft is not None and im.format == "JPEG":
            im.draft("RGB", draft)
        return im.convert("RGB")


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """uint8 (H, W, 3) array or PIL image -> PNG bytes (lossless)."""
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, format="PNG")
    return buf.getvalue()


def normalize(images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) in 0..255 -> float32 (N, 3, H, W) normalised, on the images' device (the same arithmetic
    as torchvision's ``ToTensor`` + ``Normalize``, so the result is bitwise the old loader's)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - m) / s


def to_uint8_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) array -> uint8 (N, 3, S, S) tensor (a view when the array is contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
