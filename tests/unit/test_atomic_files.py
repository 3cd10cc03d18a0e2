import json

import numpy as np
import pytest

from moce_ds.atomic_files import atomic_write, atomic_write_json, atomic_write_text
from moce_ds.engine.checkpoint import written_by_ranks


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")  # creates the folder
    assert path.read_text() == "old"

    def half(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_any_writer_fills_the_temp_file(tmp_path):
    arr = np.arange(6, dtype=np.int32)

    def save(tmp):
        with open(tmp, "wb") as f:  # np.save on a path would append .npy to the temp name
            np.save(f, arr)

    assert np.array_equal(np.load(atomic_write(tmp_path / "ids.npy", save)), arr)
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}


def test_the_ranks_that_wrote_a_checkpoint_come_from_its_record_or_its_zero_files():
    files = {"mp_rank_00_model_states.pt": 1, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 1,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "layer_0_expert_0_mp_rank_00_model_states.pt": 1}
    assert written_by_ranks({"files": files}) == 2  # checkpoints saved before world_size was recorded
    assert written_by_ranks({"files": {"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 1}}) == 1
    assert written_by_ranks({"files": files, "world_size": 4}) == 4
    assert written_by_ranks({"files": {"mp_rank_00_model_states.pt": 1}}) is None
