import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from moce_ds.customize.task_data import load_task_data


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_names_the_images_it_cannot_decode(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(_png(40 * i))
    (tmp_path / "a" / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "b" / "truncated.png").write_bytes(_png(7, size=64)[:60])  # a real header, then nothing
    (tmp_path / "b" / "notes.txt").write_text("not an image file: ignored, not 'skipped'")
    with caplog.at_level(logging.WARNING, logger="moce_ds"):
        data = load_task_data(str(tmp_path), 16)
    assert data.skipped == [str(tmp_path / "a" / "garbage.png"), str(tmp_path / "b" / "truncated.png")]
    assert len(data.train_y) + len(data.test_y) == 6 and data.all_images.shape == (6, 16, 16, 3)
    assert "2 task image(s)" in caplog.text and "garbage.png" in caplog.text


def test_shards_name_an_undecodable_sample_by_shard_and_key(tmp_path):
    with tarfile.open(tmp_path / "task-000000.tar", "w") as tar:
        for key, image, label in [("k0", _png(0), 0), ("k1", b"\x89PNG broken", 1), ("k2", _png(90), 1),
                                  ("k3", _png(200), 0)]:
            for ext, data in (("png", image), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = load_task_data(str(tmp_path), 8)
    assert data.skipped == ["task-000000.tar:k1"]
    assert sorted(np.concatenate([data.train_y, data.test_y]).tolist()) == [0, 0, 1]


def test_a_folder_with_nothing_decodable_is_an_error_that_counts_them(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no readable images .* \(1 did not decode\)"):
        load_task_data(str(tmp_path), 8)
