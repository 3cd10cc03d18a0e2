"""Bad inputs stop the real launcher before training with one clear line, and change nothing on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moce_ds.engine.distributed import free_port
from tests.dist.launch import ROOT, write_ds_config

pytestmark = pytest.mark.timeout(600)


def _launch(*args: str) -> subprocess.CompletedProcess:
    # a single rank, as the deepspeed launcher would set it up, on a port no other test holds
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_cache) -> tuple[Path, Path]:
    """A short single-rank run with a checkpoint, to resume (wrongly) from."""
    run = tmp_path_factory.mktemp("bad") / "run"
    ds = write_ds_config(tmp_path_factory.mktemp("ds") / "ds.json")
    proc = _launch("--deepspeed_config", str(ds), f"output_dir={run}", f"data.cache_dir={embedded_cache}",
                   "train.max_steps=2", "data.num_workers=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, ds


def _init_from_files(tmp: Path) -> tuple[Path, Path, Path]:
    """model.init_from files that do not fit model.size=mini: a mini MAE (official MAE layout), the same with patch 8,
    and a timm ResNet (safetensors)."""
    import dataclasses

    import timm
    import torch
    from safetensors.torch import save_file

    from moce_ds.config import load_config
    from moce_ds.model import MaskedAutoencoderViT, get_spec

    dense = load_config([], ["moe.routing=dense"]).moe
    torch.save({"model": MaskedAutoencoderViT(get_spec("mini"), dense).state_dict()}, tmp / "mini_mae.pth")
    patch8 = dataclasses.replace(get_spec("mini"), patch_size=8)
    torch.save({"model": MaskedAutoencoderViT(patch8, dense).state_dict()}, tmp / "patch8_mae.pth")
    save_file(timm.create_model("test_resnet").state_dict(), tmp / "resnet.safetensors")
    return tmp / "mini_mae.pth", tmp / "patch8_mae.pth", tmp / "resnet.safetensors"


def _short_sidecar(user_data: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the user data folder whose round's ids.npy lost its last 8 ids; returns (folder, round folder)."""
    import numpy as np

    short = tmp / "short_sidecar"
    short.mkdir()
    for p in user_data.iterdir():
        if p.name != "clusters":
            (short / p.name).symlink_to(p.resolve())
    shutil.copytree(user_data / "clusters", short / "clusters")
    rnd = sorted((short / "clusters").glob("round_*"))[0]
    np.save(rnd / "ids.npy", np.load(rnd / "ids.npy")[:-8])
    return short, rnd


def _cases(run: Path, ds: Path, tmp: Path, cache: Path, user_data: Path,
           two_rank: Path) -> list[tuple[list[str], str, Path]]:
    zero3 = write_ds_config(tmp / "zero3.json", zero_optimization={"stage": 3})
    fp16 = write_ds_config(tmp / "fp16.json", fp16={"enabled": True})
    new = tmp / "new_run"
    common = [f"data.cache_dir={cache}", "data.num_workers=0"]
    mini_mae, patch8_mae, resnet = _init_from_files(tmp)
    short, short_round = _short_sidecar(user_data, tmp)
    return [
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"model.init_from={mini_mae}",
          "model.size=vit_tiny_patch16_224", *common],
         f"error: model.init_from={mini_mae} holds a ViT MAE of another size (dim 128, depth 6, patch 4, 64 patches, "
         f"decoder 64x2) than model.size (dim 192, depth 12, patch 16, 196 patches, decoder 128x4)", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"model.init_from={patch8_mae}", *common],
         f"error: model.init_from={patch8_mae} holds a ViT MAE of another size (dim 128, depth 6, patch 8", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"model.init_from={run}", *common],
         f"error: model.init_from={run} is a MoE run (moe.routing=cluster), not dense", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"model.init_from={tmp / 'no_such.pth'}", *common],
         f"error: model.init_from={tmp / 'no_such.pth'} does not exist", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"model.init_from={resnet}", *common],
         f"error: model.init_from={resnet} is not a ViT (no patch_embed.proj.weight", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "moe.num_expert=4"],
         "config error: unknown config key 'moe.num_expert'. Did you mean 'num_experts'?", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "train.epochs=ten"],
         "config error: config key 'train.epochs' must be of type int", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "moe.ep_size=3"],
         "config error: moe.num_experts=4 is not divisible by moe.ep_size=3", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "moe.ep_size=2", *common],
         "error: moe.ep_size=2 does not divide the world size 1", new),
        (["--deepspeed_config", str(zero3), f"output_dir={new}", *common],
         "error: ZeRO stage 3 does not support DeepSpeed's native MoE", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"data.path={user_data}", "moe.num_clusters=8",
          *common], "error: cluster round 0 at", new),
        (["--deepspeed_config", str(ds), f"output_dir={run}", "moe.num_experts=8", "--resume", *common],
         "config error: --resume would change moe.num_experts from 4 to 8", run),
        (["--deepspeed_config", str(ds), f"output_dir={run}", "moe.num_experts=8", "--resume", "--allow-changes",
          *common], "error: checkpoint 'step00000002' in", run),
        (["--deepspeed_config", str(ds), f"output_dir={run}", f"data.path={user_data}", "--resume", *common],
         f"config error: --resume would change data.path from '' to '{user_data}'", run),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "--allow-changes", *common],
         "config error: --allow-changes only applies with --resume", new),
        (["--deepspeed_config", str(ds), f"output_dir={two_rank}", "--resume", *common],
         f"error: checkpoint 'step00000040' in {two_rank} was written by 2 rank(s); this run has 1: resume with "
         f"--num_gpus 2", two_rank),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "train.lr=-1", *common],
         "config error: train.lr=-1.0 must be > 0", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "model.mask_ratio=0", *common],
         "config error: model.mask_ratio=0.0 must be in (0, 1)", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "moe.layers=[99]", *common],
         "error: moe.layers=[99] names blocks [99] outside the encoder's 0..5", new),
        (["--deepspeed_config", str(fp16), f"output_dir={new}", *common],
         "error: the DeepSpeed config enables fp16, which this cpu run cannot train in", new),
        (["--deepspeed_config", str(ds), f"output_dir={new}", f"data.path={short}", *common],
         f"error: cluster round 0 at {short_round} has ids for 5000 images but", new),
        (["--deepspeed_config", str(ds), f"output_dir={run}", *common],
         f"error: output_dir={run} already holds checkpoints", run),
        (["--deepspeed_config", str(ds), f"output_dir={new}", "--resume", *common],
         "error: --resume was given but", new),
        (["--deepspeed_config", str(tmp / "missing.json"), f"output_dir={new}", *common],
         "error: DeepSpeed config", new),
    ]


def test_bad_inputs_fail_fast_with_one_clear_line(finished_run, user_data_k16, two_rank_run, tmp_path,
                                                  embedded_cache):
    run, ds = finished_run
    two_rank = tmp_path / "two_rank_copy"  # resumed on 1 rank: refused; a copy, since other tests read the original
    shutil.copytree(two_rank_run[0], two_rank, symlinks=True)
    failures = []
    for args, expected, out_dir in _cases(run, ds, tmp_path, embedded_cache, user_data_k16, two_rank):
        before = _snapshot(out_dir)
        proc = _launch(*args)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if proc.returncode != 2 or not last.startswith(expected):
            failures.append(f"{args[-1]}: rc={proc.returncode}, last stderr line: {last!r}, expected {expected!r}")
        if _snapshot(out_dir) != before:
            failures.append(f"{args}: {out_dir} changed on disk")
    assert not failures, "\n".join(failures)
