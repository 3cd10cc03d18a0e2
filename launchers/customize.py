"""Task customisation: a MoCE checkpoint + a downstream task -> a dense timm ViT and a selection report.

    python launchers/customize.py --checkpoint runs/moce --task digits --out runs/moce/custom/digits
    (--task: an embedded task name, an ImageFolder folder or a folder of shards)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="run folder, checkpoints/ folder or a tag folder")
    p.add_argument("--task", required=True, help="embedded task (digits, faces, texture_photo, microscopy) or folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/custom/<task>)")
    p.add_argument("--centroids", type=Path, default=None, help="clustering round folder (default: the run's)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier rows in the export (default: 1000 for timm's standard names, else 0)")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedded data set cache (default ~/.cache/moce_ds)")
    p.add_argument("--rule", default="path", choices=("path", "per_layer", "merge"),
                   help="path: the expert tuple with the largest routing mass (a route the task's images take); "
                        "per_layer: each layer's best expert alone; merge: experts averaged by routing mass")
    p.add_argument("--features", default=None,
                   help="featurise the task with this source (a run or checkpoint folder, timm:NAME, pixel) instead "
                        "of the round's own, e.g. when that checkpoint was deleted")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the Hugging Face folder <out>/hf (written by default when transformers is installed)")
    args = p.parse_args(argv)

    from moce_ds.customize import customize
    from moce_ds.metrics import setup_logging

    setup_logging(None, 0)
    out = args.out or (args.checkpoint / "custom" / Path(args.task).name)
    try:
        res = customize(args.checkpoint, args.task, out, args.centroids, args.num_classes, args.cache_dir,
                        features=args.features, hf=not args.no_hf, rule=args.rule)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((res.report["markdown"]).read_text())
    print(f"dense ViT: {res.checkpoint}\nload it with: {res.timm_call}\nreport: {res.report['heatmap']}")
    if res.hf_folder:
        print(f"Hugging Face: ViTModel.from_pretrained(\"{res.hf_folder}\", add_pooling_layer=False)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
