"""The exporter's series, names and label sets, read straight from its private registry (no HTTP needed)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moce_ds.config import ConfigError, load_config
from moce_ds.engine.distributed import free_port
from moce_ds.metrics.prometheus import MetricsExporter, load_cv, write_clustering_textfile


def _value(exp: MetricsExporter, name: str, **labels) -> float | None:
    return exp.registry.get_sample_value(name, labels or None)


def test_counters_and_gauges_follow_the_conventions() -> None:
    exp = MetricsExporter()  # no port: registry only
    exp.observe_data_wait(0.002)
    exp.add_skipped({"corrupt_image": 2, "no_cluster_id": 0})
    exp.observe_step(0.3, 16)
    exp.observe_step(0.2, 16)
    exp.add_nonfinite()
    exp.set_position(7, 1, 3)
    exp.set_losses(0.9, 0.85, 5.0, 1e-3)
    exp.add_expert_load({"1": {"tokens_requested": [30, 10, 0, 0], "tokens_kept": [20, 10, 0, 0],
                               "images": [2, 1, 0, 0], "dropped_share": 0.25}})
    assert _value(exp, "moce_images_processed_total") == 32
    assert _value(exp, "moce_step_seconds_count") == 2
    assert _value(exp, "moce_step_seconds_sum") == pytest.approx(0.5)
    assert _value(exp, "moce_data_wait_seconds_count") == 1
    assert _value(exp, "moce_samples_skipped_total", reason="corrupt_image") == 2
    assert _value(exp, "moce_samples_skipped_total", reason="no_cluster_id") is None  # zero counts add no series
    assert _value(exp, "moce_nonfinite_losses_total") == 1
    assert _value(exp, "moce_cluster_round") == 3
    assert _value(exp, "moce_loss") == 0.9 and _value(exp, "moce_aux_loss") == 5.0
    assert _value(exp, "moce_expert_tokens_routed_total", layer="1", expert="0") == 30
    assert _value(exp, "moce_expert_tokens_dropped_total", layer="1", expert="0") == 10
    assert _value(exp, "moce_expert_images_routed_total", layer="1", expert="1") == 1
    assert _value(exp, "moce_expert_load_cv", layer="1") == pytest.approx(load_cv([20, 10, 0, 0]))
    assert _value(exp, "moce_dropped_share", layer="1") == 0.25
    for fam in exp.registry.collect():
        assert fam.name.startswith("moce_")
        for s in fam.samples:
            assert set(s.labels) <= {"layer", "expert", "reason", "le"}, s  # bounded label sets only


def test_load_cv() -> None:
    assert load_cv([5, 5, 5, 5]) == 0
    assert load_cv([0, 0]) == 0
    assert load_cv([4, 0]) == pytest.approx(1.0)


def test_http_endpoint_and_independent_registries() -> None:
    port = free_port()
    a = MetricsExporter(port, "127.0.0.1")
    b = MetricsExporter()  # a second exporter in the same process: its own registry, no clash
    try:
        a.observe_step(0.1, 5)
        b.observe_step(0.1, 7)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["moce_images_processed"].samples[0].value == 5
    finally:
        a.close()


def test_busy_port_does_not_raise(caplog) -> None:
    port = free_port()
    a = MetricsExporter(port, "127.0.0.1")
    try:
        b = MetricsExporter(port, "127.0.0.1")  # the run goes on; the warning names the fix
        b.observe_step(0.1, 1)
        assert "metrics.port_base" in caplog.text
    finally:
        a.close()


def test_clustering_textfile(tmp_path) -> None:
    path = write_clustering_textfile(tmp_path / "moce_cluster.prom", 2, 4, 0.25, [10, 0, 5, 5], 12, 3.5, 20)
    fams = {f.name: f.samples[0].value for f in text_string_to_metric_families(path.read_text())}
    assert fams["moce_cluster_round"] == 2 and fams["moce_cluster_objective"] == 0.25
    assert fams["moce_cluster_empty"] == 1 and fams["moce_cluster_size_max_images"] == 10
    assert fams["moce_cluster_last_success_timestamp_seconds"] > 1.6e9


def test_metrics_config() -> None:
    cfg = load_config([], ["metrics.enabled=false", "metrics.port_base=9600", "metrics.bind=0.0.0.0"])
    assert (cfg.metrics.enabled, cfg.metrics.port_base, cfg.metrics.bind, cfg.metrics.report) == (
        False, 9600, "0.0.0.0", True)
    with pytest.raises(ConfigError, match="port_base"):
        load_config([], ["metrics.port_base=70000"])
    with pytest.raises(ConfigError, match="metrics.enabled"):
        load_config([], ["metrics.enabled=3"])


def test_grafana_dashboard_uses_only_exported_series() -> None:
    import json
    import re
    from pathlib import Path

    import moce_ds.metrics

    dash = json.loads((Path(moce_ds.metrics.__file__).parent / "grafana_dashboard.json").read_text())
    exp = MetricsExporter()
    exp.set_alltoall([])
    names = {s.name for fam in exp.registry.collect() for s in fam.samples}
    names |= {f"{n}_bucket" for n in ("moce_step_seconds", "moce_data_wait_seconds")}
    names |= {"moce_cluster_last_success_timestamp_seconds"}  # the clustering job's textfile
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmoce_[a-z_]+", e)}
    assert used and used <= names | {"moce_samples_skipped_total", "moce_expert_tokens_routed_total",
                                     "moce_expert_tokens_dropped_total", "moce_expert_load_cv",
                                     "moce_dropped_share"}, used - names
