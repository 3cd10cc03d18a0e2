"""The GPU check's launcher runs (benchmarks/gpu_check.py::engine_steps), exercised on CPU at a small size so the
first GPU day does not fail on the plumbing: the real deepspeed launcher, zero2_bf16.json, metrics read back."""

from __future__ import annotations

import pytest

from tests.script_module import load_script

pytestmark = pytest.mark.timeout(600)


def test_engine_steps_runs_the_real_launcher_and_reads_its_metrics(tmp_path, embedded_cache):
    gpu_check = load_script("benchmarks/gpu_check.py", "gpu_check")
    rec = gpu_check.engine_steps(1, False, steps=5, batch=8, tmp=tmp_path, size="mini",
                                 extra=[f"data.cache_dir={embedded_cache}", "data.num_workers=0"])
    assert rec["rc"] == 0, rec.get("error")
    assert rec["steps"] == 5 and rec["images_per_s_median"] > 0 and rec["last_loss"] < 10
