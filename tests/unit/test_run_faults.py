"""Faults around a run's files, in process: disk space at a save, incomplete tags on resume, metrics.jsonl after a
resume, the non-finite stop message, and small-run warnings."""

from __future__ import annotations

import collections
import logging

import pytest

from moce_ds.config import load_config
from moce_ds.engine import checkpoint
from moce_ds.engine.checkpoint import CheckpointSpaceError, complete_tags, latest_tag, save_checkpoint, verify_tag
from moce_ds.engine.step_loop import nonfinite_message, warn_small_run
from moce_ds.metrics.jsonl import JsonlWriter, read_jsonl

Usage = collections.namedtuple("Usage", "total used free")


class FakeEngine:
    """Writes a DeepSpeed-like tag folder of `size` bytes, or raises `error` as torch's writer does."""

    def __init__(self, size: int = 4096, error: Exception | None = None) -> None:
        self.size, self.error = size, error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = checkpoint.Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.error:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise self.error
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * self.size)


def _save(cfg, tag: str, engine: FakeEngine):
    return save_checkpoint(engine, cfg, tag, {"step": int(tag[4:]), "epoch": 0, "micro_in_epoch": 0}, True,
                           lambda: None)


def test_a_save_that_would_not_fit_fails_in_one_line_and_keeps_the_older_checkpoint(tmp_path, monkeypatch):
    cfg = load_config([], [f"output_dir={tmp_path / 'run'}"])
    ckpts = tmp_path / "run" / "checkpoints"
    _save(cfg, "step00000002", FakeEngine(size=3 * 2**20))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: Usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(CheckpointSpaceError) as e:
        _save(cfg, "step00000004", FakeEngine())
    msg = str(e.value)
    assert msg.startswith(f"not enough disk space for checkpoint {ckpts / 'step00000004'}: 1 MiB free") and \
        "\n" not in msg, msg
    assert "the previous checkpoint took 3 MiB" in msg and "step00000002 is intact" in msg
    assert not (ckpts / "step00000004").exists()  # checked before anything was written
    assert complete_tags(ckpts) == ["step00000002"] and verify_tag(ckpts, "step00000002") is None


def test_torch_writer_failure_during_a_save_names_the_space_and_the_folder(tmp_path):
    cfg = load_config([], [f"output_dir={tmp_path / 'run'}"])
    ckpts = tmp_path / "run" / "checkpoints"
    _save(cfg, "step00000002", FakeEngine())
    raw = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: "
                       "file write failed")
    with pytest.raises(CheckpointSpaceError, match=r"^writing checkpoint .*step00000004 failed \(\d+ MiB free on "
                                                   r"its file system: most likely out of disk space\)") as e:
        _save(cfg, "step00000004", FakeEngine(error=raw))
    assert "step00000002 is intact" in str(e.value) and e.value.__cause__ is raw
    assert latest_tag(ckpts) == "step00000002"
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass through untouched
        _save(cfg, "step00000006", FakeEngine(error=RuntimeError("something else")))


def test_incomplete_tags_are_named_on_resume(tmp_path, caplog):
    cfg = load_config([], [f"output_dir={tmp_path / 'run'}"])
    ckpts = tmp_path / "run" / "checkpoints"
    _save(cfg, "step00000002", FakeEngine())
    (ckpts / "step00000004").mkdir()  # killed mid-save: files, no completion record
    with caplog.at_level(logging.WARNING, logger="moce_ds"):
        assert latest_tag(ckpts) == "step00000002"
    assert f"checkpoint {ckpts / 'step00000004'} is skipped: no completion record" in caplog.text
    assert "using 'step00000002' instead" in caplog.text


def test_resumed_metrics_hold_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    w = JsonlWriter(path, keep_through_step=2)  # resumed from step 2's checkpoint
    w.write({"step": 3, "loss": 0.31})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 0.1), (2, 0.2), (3, 0.31)]
    moved = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert moved[:2] == ['{"step": 3, "loss": 0.3}', '{"step": 4, "loss": 0.4}'] and moved[2].startswith('{"step": 5')
    JsonlWriter(path, keep_through_step=3).close()  # nothing later: the file is left as it is
    assert len(read_jsonl(path)) == 3


def test_nonfinite_stop_says_whether_a_checkpoint_exists(tmp_path):
    cfg = load_config([], [f"output_dir={tmp_path / 'run'}"])
    ckpts = tmp_path / "run" / "checkpoints"
    none = nonfinite_message(5, 5, ckpts)
    assert none.startswith("5 non-finite losses in a row at step 5: training stopped; no checkpoint was saved yet")
    assert "is intact" not in none and "model.mask_ratio" in none
    _save(cfg, "step00000002", FakeEngine())
    some = nonfinite_message(3, 4, ckpts)
    assert f"the last good checkpoint step00000002 in {ckpts} is intact" in some and "--resume" in some


def test_small_runs_get_one_warning_with_the_numbers(caplog):
    cfg = load_config([], ["train.warmup_steps=50", "train.log_every=10"])
    with caplog.at_level(logging.WARNING, logger="moce_ds"):
        warned = warn_small_run(cfg, steps_per_epoch=3, max_steps=40)
    assert len(warned) == 2 and len(caplog.records) == 2
    assert warned[0].startswith("train.warmup_steps=50 is longer than the run (40 steps)")
    assert warned[1].startswith("an epoch has 3 optimizer steps, fewer than train.log_every=10")
    assert warn_small_run(load_config([], ["train.warmup_steps=5", "train.log_every=1"]), 3, 40) == []
