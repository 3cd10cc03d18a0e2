"""A full disk at a save, a non-finite streak before any checkpoint and a resume that changes the settings of a run,
through the launcher in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moce_ds.engine.checkpoint import complete_tags
from moce_ds.engine.distributed import free_port
from tests.dist.launch import ROOT

pytestmark = pytest.mark.timeout(600)
WORKERS = ROOT / "tests" / "dist" / "workers"


def _one_rank(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def test_a_full_disk_stops_the_save_in_one_line_and_keeps_the_older_checkpoint(embedded_cache, tmp_path):
    run = tmp_path / "full"
    proc = _one_rank(WORKERS / "pretrain_disk_full.py", f"output_dir={run}", f"data.cache_dir={embedded_cache}",
                     "data.num_workers=0", "train.max_steps=4", "train.save_every_steps=2", "metrics.report=false")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _last_line(proc).startswith(f"error: not enough disk space for checkpoint {run / 'checkpoints'}"
                                       f"/step00000004: 0 MiB free on its file system"), _last_line(proc)
    assert complete_tags(run / "checkpoints") == ["step00000002"]
    assert not (run / "checkpoints" / "step00000004").exists()


def test_a_nonfinite_streak_before_any_checkpoint_says_there_is_none(embedded_cache, tmp_path):
    from tests.dist.launch import write_ds_config

    run = tmp_path / "nan_first"
    proc = _one_rank(WORKERS / "pretrain_with_nan.py", "--nan-at=1,2,3", str(write_ds_config(tmp_path / "ds.json")),
                     f"output_dir={run}", f"data.cache_dir={embedded_cache}", "data.num_workers=0",
                     "train.max_steps=4", "train.max_nonfinite_in_row=3")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _last_line(proc).startswith("error: 3 non-finite losses in a row at step 3: training stopped; no "
                                       f"checkpoint was saved yet (none in {run / 'checkpoints'})"), _last_line(proc)


def test_a_resume_continues_the_recorded_run_and_keeps_its_earlier_settings(user_data_k16, tmp_path):
    from tests.dist.launch import write_ds_config

    run, ds = tmp_path / "record", write_ds_config(tmp_path / "ds.json")
    pretrain = ROOT / "launchers" / "pretrain.py"
    proc = _one_rank(pretrain, "--deepspeed_config", str(ds), f"output_dir={run}", f"data.path={user_data_k16}",
                     "data.num_workers=0", "train.max_steps=2", "train.log_every=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the run report shows reconstructions for user shards too, from a fixed sample of the first shard
    assert (run / "report" / "reconstructions.png").is_file()
    assert "the first 16 images of the first shard" in (run / "report" / "report.md").read_text()

    # --resume without repeating data.path: the saved config.yaml supplies it; each change is logged
    proc = _one_rank(pretrain, "--deepspeed_config", str(ds), f"output_dir={run}", "--resume", "data.num_workers=0",
                     "train.max_steps=4", "metrics.report=false")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"shards in {user_data_k16}" in out  # trained on the user shards, not the embedded set
    assert "resume changes train.max_steps: 2 -> 4" in out and "resume changes metrics.report: True -> False" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(user_data_k16) and cfg["train"]["max_steps"] == 4
    before = yaml.safe_load((run / "config.1.yaml").read_text())  # the settings the first two steps ran with
    assert before["train"]["max_steps"] == 2 and before["data"]["path"] == str(user_data_k16)
    assert (run / "ds_config.1.json").read_text() == (run / "ds_config.json").read_text()
    assert complete_tags(run / "checkpoints")[-1] == "step00000004"

    # a resume that fails leaves the record byte-identical
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    proc = _one_rank(pretrain, "--deepspeed_config", str(ds), f"output_dir={run}", "--resume", "data.num_workers=0",
                     "train.max_steps=6", "train.lr=-1")
    assert proc.returncode == 2 and _last_line(proc).startswith("config error: train.lr=-1.0 must be > 0")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"} == files
