"""bf16 runs reduce gradients in fp32 unless the DeepSpeed JSON says otherwise (issue 17 item 6)."""

from pathlib import Path

from moce_ds.engine.ds_config import load_ds_config, with_comm_dtype_default

ROOT = Path(__file__).resolve().parents[2]


def test_fp32_gradient_communication_by_default():
    assert with_comm_dtype_default({"bf16": {"enabled": True}})["communication_data_type"] == "fp32"
    assert with_comm_dtype_default({"bf16": {"enabled": True}, "communication_data_type": "bf16"})[
        "communication_data_type"] == "bf16"  # configurable
    assert "communication_data_type" not in with_comm_dtype_default({})  # fp32 training: nothing to say
    assert load_ds_config(ROOT / "ds_configs" / "zero2_bf16.json")["communication_data_type"] == "fp32"
