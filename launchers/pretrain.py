"""MoCE pre-training.

    deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero2.json [--config exp.yaml ...]
        [--resume [--allow-changes]] [key=value ...]

With no data named (data.path empty) it trains on the embedded default data set, built on first use.
--resume continues from the run's own config.yaml with the given --config files and overrides on top (each
change is printed); changing the data, the model's size or the routing on resume needs --allow-changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from moce_ds.config import ConfigError, load_config, resume_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", default="ds_configs/zero2.json", help="DeepSpeed JSON (engine settings)")
    parser.add_argument("--config", action="append", default=[], help="experiment YAML; may repeat, later wins")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: allow overrides that change the data, model size or routing")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 moe.num_experts=8")
    args = parser.parse_intermixed_args(argv)  # flags may come after overrides
    try:
        if args.allow_changes and not args.resume:
            raise ConfigError("--allow-changes only applies with --resume (a new run takes any setting).")
        changes = []
        if args.resume:
            cfg, changes = resume_config(args.config, args.overrides, args.allow_changes)
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from moce_ds.engine import pretrain
    from moce_ds.engine.trainer import NonFiniteLossError

    try:
        result = pretrain(cfg, args.deepspeed_config, resume=args.resume, changes=changes)
    except ValueError as e:  # bad input: one clear line, nothing on disk touched
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.is_main and result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}; "
              f"continue with --resume")
    elif result.is_main:
        print(f"done: step {result.step}, loss {result.last_loss:.4f}, checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
