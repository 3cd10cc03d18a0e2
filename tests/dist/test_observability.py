"""Observability on real ranks: every rank's /metrics while a 2-rank run trains; the run report afterwards."""

from __future__ import annotations

import importlib.util
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from matplotlib.image import imread
from prometheus_client.parser import text_string_to_metric_families

from moce_ds.model import get_spec
from moce_ds.engine.distributed import free_port
from tests.dist.launch import ROOT, WORKER, two_rank_overrides, write_ds_config


def _free_port_pair() -> int:
    """A base port with base and base + 1 free (rank r serves on base + local rank)."""
    for _ in range(50):
        base = free_port()
        if base >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def _scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(m: dict, name: str, **labels) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def _per_expert(m: dict, name: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (n, labels), v in m.items():
        if n == name:
            d = dict(labels)
            out.setdefault(d["layer"], {})[d["expert"]] = v
    return out


def test_every_rank_serves_metrics_while_training(embedded_cache, tmp_path) -> None:
    base = _free_port_pair()
    ds = write_ds_config(tmp_path / "ds.json")
    run = tmp_path / "run"
    overrides = [*two_rank_overrides(run, embedded_cache, 100), f"metrics.port_base={base}", "metrics.bind=127.0.0.1",
                 "metrics.report=false"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(WORKER), str(ds), *overrides]
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        first: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait until both ranks have trained a step
            first = [_scrape(base), _scrape(base + 1)]
            if all(m and (_get(m, "moce_images_processed_total") or 0) > 0 for m in first) and \
                    _per_expert(first[0], "moce_expert_tokens_routed_total"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no metrics from both ranks (rc {proc.poll()}):\n"
                                 f"{(tmp_path / 'launcher.log').read_text()[-4000:]}")
        time.sleep(1.5)
        second = [_scrape(base), _scrape(base + 1)]
        assert all(second), "an endpoint went away while the run was still training (raise train.max_steps)"
    finally:
        proc.wait(timeout=300)
        log.close()
    assert proc.returncode == 0, (tmp_path / "launcher.log").read_text()[-4000:]

    for a, b in zip(first, second):
        assert _get(b, "moce_images_processed_total") > _get(a, "moce_images_processed_total")
        assert _get(b, "moce_step_seconds_count") >= 1 and _get(b, "moce_step_seconds_sum") > 0
        assert _get(b, "moce_data_wait_seconds_count") >= 1
        assert 0 < _get(b, "moce_loss") < 10 and math.isfinite(_get(b, "moce_aux_loss"))
        assert _get(b, "moce_cluster_round") == 0  # the embedded set's first round
        assert _get(b, "moce_nonfinite_losses_total") == 0
    assert not _per_expert(second[1], "moce_expert_tokens_routed_total")  # per-expert series: rank 0 only

    m = second[0]
    routed = _per_expert(m, "moce_expert_tokens_routed_total")
    dropped = _per_expert(m, "moce_expert_tokens_dropped_total")
    images = _per_expert(m, "moce_expert_images_routed_total")
    assert sorted(routed, key=int) == ["1", "3", "5"] and all(len(v) == 4 for v in routed.values())
    spec = get_spec("mini")
    tokens_per_image = 1 + int(spec.num_patches * (1 - 0.75))  # cls + kept patches, top-1
    totals = {layer: sum(v.values()) for layer, v in routed.items()}
    assert len(set(totals.values())) == 1  # every layer routes every token once
    routed_images = next(iter(totals.values())) / tokens_per_image
    assert routed_images == int(routed_images)
    # ranks step in lockstep: all ranks' images = 2 x rank 0's, give or take the step in flight at the scrape
    assert abs(routed_images - 2 * _get(m, "moce_images_processed_total")) <= 32
    for layer in routed:
        for e in routed[layer]:
            assert 0 <= dropped[layer][e] <= routed[layer][e]
        assert sum(images[layer].values()) <= routed_images
        assert 0 <= _get(m, "moce_expert_load_cv", layer=layer) < 2


def test_run_report_from_a_finished_run(two_rank_run, tmp_path) -> None:
    run, _ = two_rank_run
    assert (run / "report" / "report.md").is_file()  # rank 0 wrote one when pre-training ended
    spec = importlib.util.spec_from_file_location("report_launcher", ROOT / "launchers" / "report.py")
    launcher = importlib.util.module_from_spec(spec)  # launchers/report.py: the on-demand path
    spec.loader.exec_module(launcher)
    assert launcher.main([str(run), "--out", str(tmp_path / "again")]) == 0
    md = (tmp_path / "again" / "report.md").read_text()
    for png in ("loss.png", "throughput.png", "expert_load.png", "routing.png", "reconstructions.png"):
        assert f"]({png})" in md, md
        path: Path = tmp_path / "again" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100 and float(np.std(img[..., :3])) > 0.01, png
