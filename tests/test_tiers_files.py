"""Atomic writes leave either the old file or the new one, never a partial file."""

from __future__ import annotations

import pytest
import torch

from memfit.errors import CheckpointError
from memfit.tiers.files import atomic_write, atomic_write_json, load_tensors, read_json, save_tensors


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def crash(f):
        f.write(b'{"step": 2')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert read_json(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_disk_error_is_a_checkpoint_error(tmp_path):
    def full_disk(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device.*Nothing was replaced"):
        atomic_write(tmp_path / "x.bin", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_tensor_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
