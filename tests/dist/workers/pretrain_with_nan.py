"""Pre-train with NaN losses injected at chosen forward calls: `--nan-at=3,4 <ds_config> overrides...`."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moce_ds.config import load_config  # noqa: E402
from moce_ds.engine import pretrain  # noqa: E402
from moce_ds.engine.trainer import NonFiniteLossError  # noqa: E402
from moce_ds.model import MaskedAutoencoderViT  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
nan_at = {int(x) for x in args.pop(0).removeprefix("--nan-at=").split(",")}
calls = {"n": 0}
original = MaskedAutoencoderViT.forward


def forward_with_nan(self, *a, **kw):
    out = original(self, *a, **kw)
    calls["n"] += 1
    if calls["n"] in nan_at:
        out.loss = out.loss * torch.tensor(float("nan"))
    return out


MaskedAutoencoderViT.forward = forward_with_nan
try:
    pretrain(load_config([], args[1:]), args[0])
except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
