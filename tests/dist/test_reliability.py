"""Preemption, dead ranks, truncated checkpoints and non-finite losses, with real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moce_ds.engine.checkpoint import complete_tags, latest_tag
from moce_ds.engine.distributed import free_port
from moce_ds.metrics import read_jsonl
from tests.dist.launch import ROOT, WORKER, run_deepspeed, two_rank_overrides

pytestmark = pytest.mark.timeout(900)
NAN_WORKER = ROOT / "tests" / "dist" / "workers" / "pretrain_with_nan.py"


def _launch_logged(cmd: list[str], output: Path, **kw) -> subprocess.Popen:
    """A launcher whose stdout+stderr go to a file, readable while it runs: a wait that times out can show what the
    ranks printed (this test once timed out in a full-suite run with nothing to show for it)."""
    with output.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300,
                   output: Path | None = None) -> None:
    deadline = time.time() + timeout
    log = run / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            text = output.read_text() if output is not None else proc.stdout.read()
            raise AssertionError(f"the run ended early with {proc.returncode}: {text[-3000:]}")
        if log.is_file() and any(r["step"] >= step for r in read_jsonl(log)):
            return
        time.sleep(0.5)
    shown = f": {output.read_text()[-3000:]}" if output is not None else ""
    raise AssertionError(f"step {step} not reached in {timeout} s{shown}")


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]


def test_sigterm_checkpoints_and_resume_matches_the_uninterrupted_run(two_rank_run, embedded_cache, tmp_path):
    full_run, ds = two_rank_run
    run = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(WORKER), str(ds), *two_rank_overrides(run, embedded_cache, 40)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(run, 8, launcher)
    for p in _ranks(launcher):  # as a scheduler does: every rank gets the signal
        p.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    stopped = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert 8 <= stopped < 40
    assert latest_tag(run / "checkpoints") == f"step{stopped:08d}"

    run_deepspeed(WORKER, [str(ds), "--resume", *two_rank_overrides(run, embedded_cache, 40)])
    full = {r["step"]: r["loss"] for r in read_jsonl(full_run / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(again) == list(range(1, 41))
    for step in (stopped + 1, stopped + 2, 40):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_killed_rank_makes_the_other_exit_naming_it_and_relaunch_resumes(embedded_cache, tmp_path):
    """Ranks started without the deepspeed launcher (as on two nodes), so nothing else kills the survivor."""
    run, ds = tmp_path / "killed", tmp_path / "ds.json"
    from tests.dist.launch import write_ds_config

    write_ds_config(ds)
    overrides = [*two_rank_overrides(run, embedded_cache, 400), "train.save_every_steps=4", "train.peer_timeout_s=5"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(ds), *overrides], cwd=ROOT, env=_rank_env(r, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    _wait_for_step(run, 6, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.time() - t0
    assert procs[0].returncode != 0
    assert waited < 5 + 30, waited  # the configured timeout plus slack, not gloo's 30 minutes
    log = (run / "logs" / "rank0.log").read_text()
    assert "rank 1 stopped responding" in log, out[-2000:]
    saved = latest_tag(run / "checkpoints")
    assert saved is not None

    resumed = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         str(WORKER), str(ds), "--resume", *two_rank_overrides(run, embedded_cache, 12)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from '{saved}'" in (run / "logs" / "rank0.log").read_text()


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(embedded_cache, tmp_path):
    run = tmp_path / "trunc"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    base = [sys.executable, str(ROOT / "launchers" / "pretrain.py"), f"output_dir={run}",
            f"data.cache_dir={embedded_cache}", "data.num_workers=0", "train.save_every_steps=2", "train.log_every=1"]
    first = subprocess.run([*base, "train.max_steps=4"], cwd=ROOT, env={**env, "MASTER_PORT": str(free_port())},
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert complete_tags(ckpts) == ["step00000002", "step00000004"]
    victim = ckpts / "step00000004" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a crash mid-write
    assert latest_tag(ckpts) == "step00000002"
    (ckpts / "step00000006").mkdir()  # a save killed before its completion record: skipped, and named
    (ckpts / "step00000006" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    again = subprocess.run([*base, "train.max_steps=4", "--resume"], cwd=ROOT,
                           env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step00000004 is refused: mp_rank_00_model_states.pt has" in again.stdout + again.stderr
    assert "step00000006 is skipped: no completion record" in again.stdout + again.stderr
    assert "resumed from 'step00000002'" in (run / "logs" / "rank0.log").read_text()
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # each step once: 3-4 trained again from the intact checkpoint replace the first
    assert [r["step"] for r in read_jsonl(run / "metrics.superseded.jsonl")] == [3, 4]


def test_nonfinite_losses_are_skipped_counted_and_a_streak_stops_the_run(embedded_cache, tmp_path):
    from tests.dist.launch import write_ds_config

    ds = write_ds_config(tmp_path / "ds.json")
    run = tmp_path / "nan"
    overrides = [*two_rank_overrides(run, embedded_cache, 10), "train.max_nonfinite_in_row=3"]
    run_deepspeed(NAN_WORKER, ["--nan-at=3,4", str(ds), *overrides])  # two in a row: skipped, run goes on
    log = read_jsonl(run / "metrics.jsonl")
    assert log[-1]["skipped"]["nonfinite_loss"] == 2
    assert [r["step"] for r in log] == list(range(1, 11))  # no optimizer step was lost or repeated
    assert all(r["loss"] == r["loss"] for r in log)  # logged losses stay finite
    before = latest_tag(run / "checkpoints")

    stop_run = tmp_path / "nan_stop"
    proc = run_deepspeed(NAN_WORKER, ["--nan-at=3,4,5,6", str(ds), *two_rank_overrides(stop_run, embedded_cache, 10),
                                      "train.max_nonfinite_in_row=3", "train.save_every_steps=1"], check=False)
    assert proc.returncode != 0
    assert re.search(r"3 non-finite losses in a row at step \d+: training stopped", proc.stdout + proc.stderr)
    assert latest_tag(stop_run / "checkpoints") == "step00000002"  # the last good checkpoint, intact
    assert complete_tags(stop_run / "checkpoints") == ["step00000001", "step00000002"]
    assert before == "step00000010"


def _run_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(launcher.pid).children(recursive=True)


def _assert_all_gone(procs: list[psutil.Process], within: float = 30) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within)
    assert not alive, [" ".join(p.cmdline())[:200] for p in alive]


def _assert_resume_matches(run: Path, stopped: int, full_run: Path, ds: Path, embedded_cache: Path) -> None:
    run_deepspeed(WORKER, [str(ds), "--resume", *two_rank_overrides(run, embedded_cache, 40)])
    full = {r["step"]: r["loss"] for r in read_jsonl(full_run / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(again) == list(range(1, 41))
    for step in (stopped + 1, 40):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_sigterm_to_the_deepspeed_launcher_checkpoints_and_leaves_no_orphan(two_rank_run, embedded_cache, tmp_path):
    """DeepSpeed's runner dies at once on SIGTERM (no handler on one node); the ranks notice, save, and exit."""
    full_run, ds = two_rank_run
    run = tmp_path / "launcher_killed"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launchers" / "pretrain.py"), "--deepspeed_config", str(ds),
           *two_rank_overrides(run, embedded_cache, 40), "metrics.report=false"]
    launcher = _launch_logged(cmd, tmp_path / "launcher.log")
    _wait_for_step(run, 8, launcher, output=tmp_path / "launcher.log")
    procs = _run_processes(launcher)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    _assert_all_gone(procs)
    out = (tmp_path / "launcher.log").read_text()
    assert re.search(r"stopped by the end of the deepspeed launcher \(pid \d+\) at step \d+; checkpoint .*; "
                     r"continue with --resume", out), out[-3000:]
    stopped = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert latest_tag(run / "checkpoints") == f"step{stopped:08d}"
    _assert_resume_matches(run, stopped, full_run, ds, embedded_cache)


def test_sigint_to_the_supervised_process_group_stops_every_rank_and_returns_0(two_rank_run, embedded_cache,
                                                                              tmp_path):
    full_run, ds = two_rank_run
    run = tmp_path / "group_sigint"
    cmd = [sys.executable, str(ROOT / "launchers" / "supervise.py"), "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / "launchers" / "pretrain.py"), "--deepspeed_config", str(ds),
           *two_rank_overrides(run, embedded_cache, 40), "metrics.report=false"]
    launcher = _launch_logged(cmd, tmp_path / "launcher.log", start_new_session=True)  # own group, as a shell job
    _wait_for_step(run, 8, launcher, output=tmp_path / "launcher.log")
    procs = _run_processes(launcher)
    os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
    launcher.wait(timeout=60)
    out = (tmp_path / "launcher.log").read_text()
    assert launcher.returncode == 0, out[-3000:]
    _assert_all_gone(procs)
    stopped = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    assert f"stopped by SIGINT at step {stopped}; checkpoint" in out, out[-3000:]
    assert "SIGTERM" not in out
    assert latest_tag(run / "checkpoints") == f"step{stopped:08d}"
    _assert_resume_matches(run, stopped, full_run, ds, embedded_cache)
