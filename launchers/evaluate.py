"""Downstream evaluation of a frozen encoder: linear probe and k-NN (and a short fine-tune).

    python launchers/evaluate.py --model runs/moce/custom/digits/vit_mini_digits.safetensors --task digits
    python launchers/evaluate.py --model vit_base_patch16_224 --checkpoint weights.pth --task /data/my_folder
    python launchers/evaluate.py --model runs/mae_dense --task faces
    python launchers/evaluate.py --model runs/moce/custom/faces/vit_mini_faces.safetensors --task faces --finetune
    python launchers/evaluate.py --model vit_base_patch16_224 --checkpoint weights.pth --task /data/x --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="dense export (.safetensors), timm model name, or a dense/token run folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights file, with a timm model name")
    p.add_argument("--task", required=True, help="embedded task (digits, faces, texture_photo, microscopy) or folder")
    p.add_argument("--finetune", action="store_true", help="also run a short full fine-tune")
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where features are extracted and the fine-tune runs (auto: the GPU when there is one)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch for features and fine-tuning (default: 256 and 64)")
    p.add_argument("--out", type=Path, default=None, help="write the accuracies as JSON here")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedded data set cache (default ~/.cache/moce_ds)")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: pass a positive number of images")
    from moce_ds.evaluation import evaluate

    try:
        res = evaluate(args.model, args.task, args.checkpoint, args.finetune, args.finetune_epochs, args.out,
                       args.cache_dir, device=args.device, batch_size=args.batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
