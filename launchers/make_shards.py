"""Write WebDataset shards (+ manifest) from an ImageFolder tree or the embedded set.

    python launchers/make_shards.py /data/imagenet/train /data/imagenet-shards --max-per-shard 1000 --workers 16
    python launchers/make_shards.py --embedded /data/embedded-shards --num-shards 16

Rerunning the same command resumes: finished shards are skipped, half-written ones are rewritten.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from moce_ds.data.make_shards import make_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="SOURCE OUT_DIR, or OUT_DIR alone with --embedded")
    parser.add_argument("--embedded", action="store_true", help="shard the embedded default data set")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--max-per-shard", type=int, help="images per shard (the last one may hold fewer)")
    size.add_argument("--num-shards", type=int, help="number of shards (sizes differ by at most one)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes, each writes whole shards")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-00000.tar")
    parser.add_argument("--key-prefix", default="img", help="keys are KEYPREFIX-<global index> ([a-z0-9_]+)")
    parser.add_argument("--no-labels", action="store_true", help="do not write the class label (<key>.cls)")
    parser.add_argument("--encode", choices=["keep", "jpg", "png"], default="keep",
                        help="keep: store JPEG/PNG bytes as they are (default); jpg/png: re-encode")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument("--resize", type=int, default=0, help="scale the shorter side down to this (re-encodes)")
    parser.add_argument("--verify", action="store_true", help="re-hash finished shards before skipping them")
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedded set cache (default ~/.cache/moce_ds)")
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.embedded else 2):
        parser.error("give SOURCE OUT_DIR, or OUT_DIR with --embedded")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = make_shards(
            Path(args.paths[-1]), image_folder=None if args.embedded else Path(args.paths[0]),
            embedded=args.embedded, max_per_shard=args.max_per_shard, num_shards=args.num_shards,
            workers=args.workers, prefix=args.prefix, key_prefix=args.key_prefix, labels=not args.no_labels,
            encode=args.encode, quality=args.quality, resize=args.resize, verify=args.verify,
            cache_dir=args.cache_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {manifest['total']} images in {len(manifest['shards'])} shards "
          f"({manifest['num_corrupt']} corrupt skipped) -> {args.paths[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
