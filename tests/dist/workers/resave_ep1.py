"""Load a checkpoint written with any ep_size into a 1-rank engine (ep_size=1) and save it again."""

import sys
from pathlib import Path

import deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moce_ds.config import load_config, save_config  # noqa: E402
from moce_ds.engine.checkpoint import latest_tag, save_checkpoint  # noqa: E402
from moce_ds.engine.distributed import barrier, init_distributed  # noqa: E402
from moce_ds.engine.ds_config import load_ds_config  # noqa: E402
from moce_ds.engine.schedule import build_optimizer  # noqa: E402
from moce_ds.model import build_model  # noqa: E402

src, dst, ds_path = [Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")]
info = init_distributed()
cfg = load_config([src / "config.yaml"], [f"output_dir={dst}", "moe.ep_size=1"])
model = build_model(cfg, ep_size=1)
opt, sched = build_optimizer(model, 1e-3, 1e-5, 0.05, (0.9, 0.95), 1, 10)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=load_ds_config(ds_path))
tag = latest_tag(src / "checkpoints")
engine.load_checkpoint(str(src / "checkpoints"), tag=tag, load_module_only=True)
save_config(cfg, dst / "config.yaml")
save_checkpoint(engine, cfg, tag, {"step": 0, "epoch": 0, "micro_in_epoch": 0}, info.is_main, barrier)
