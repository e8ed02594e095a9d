"""The safetensors reader and the MoE expert store treat header offsets and index file names as untrusted input.

Each crafted file would be read (out of bounds, aliased, or from outside the model directory) if its check were
missing, so each test fails without the check it names rather than on some later error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memfit.errors import CheckpointError
from memfit.moe.store import _key_files
from memfit.tiers.st_reader import INDEX_NAME, SafetensorsReader, checkpoint_files


def _write(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, the data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(offsets: object, shape: object = (2,)) -> dict:
    return {"dtype": "F32", "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}


def test_valid_file_reads_back_equal(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    with SafetensorsReader(tmp_path / "ok.safetensors") as reader:
        for key, t in tensors.items():
            assert torch.equal(reader.read(key), t), key


def test_negative_begin(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([-4, 4])}, bytes(8))
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'a' has data_offsets \[-4, 4\]: begin is "
                                              r"negative; the file is corrupt"):
        SafetensorsReader(path)


def test_begin_after_end(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([8, 4])}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has data_offsets \[8, 4\]: end is before begin"):
        SafetensorsReader(path)


def test_end_beyond_the_file(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([0, 8]), "b": _f32([8, 16])}, bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'b' lies outside the file \(its data ends at byte \d+ of a "
                                              r"\d+-byte file\); the file is corrupt or truncated\. Re-save"):
        SafetensorsReader(path)


def test_length_does_not_match_dtype_and_shape(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([0, 8], (3,))}, bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has 8 bytes of data, but shape \[3\] of F32 takes 12"):
        SafetensorsReader(path)


def test_overlapping_tensors(tmp_path):
    # Each entry alone is valid; together they alias bytes 4-8.
    header = {"b": _f32([4, 12]), "a": _f32([0, 8]), "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    path = _write(tmp_path / "x.safetensors", header, bytes(12))
    with pytest.raises(CheckpointError, match=r"tensor 'b' \(file bytes \d+-\d+\) overlaps tensor 'a' .*corrupt"):
        SafetensorsReader(path)


@pytest.mark.parametrize("offsets", [[0.0, 8.0], [False, 8], [0, "8"], [0], [0, 8, 16], {"begin": 0, "end": 8}, None])
def test_offsets_that_are_not_two_ints(tmp_path, offsets):
    path = _write(tmp_path / "x.safetensors", {"a": _f32(offsets)}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has data_offsets .*, not a list of two integers"):
        SafetensorsReader(path)


@pytest.mark.parametrize("shape", [[-2, -1], [2.0], [True, 2], "2", None])
def test_bad_shape(tmp_path, shape):
    path = _write(tmp_path / "x.safetensors", {"a": _f32([0, 8], shape)}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has shape .*, not a list of non-negative integers"):
        SafetensorsReader(path)


@pytest.mark.parametrize("dtype", ["F4", ["F32"], None])
def test_unknown_dtype(tmp_path, dtype):
    path = _write(tmp_path / "x.safetensors", {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has unsupported dtype .*; memfit reads"):
        SafetensorsReader(path)


@pytest.mark.parametrize("header", [b"[1, 2]", b'"a"', b"7", b"null"])
def test_header_not_an_object(tmp_path, header):
    path = _write(tmp_path / "x.safetensors", header)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: the safetensors header is a JSON \w+, not an object"):
        SafetensorsReader(path)


def test_entry_not_an_object(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"a": [0, 8]}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has a header entry that is a JSON list, not an object"):
        SafetensorsReader(path)


# -- index file names ------------------------------------------------------------------------------------------

@pytest.fixture
def model(tmp_path) -> Path:
    """A model directory, next to a valid shard outside it that a crafted index could point at."""
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def _index(root: Path, weight_map: object) -> None:
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _refused(root: Path, match: str) -> None:
    """Both readers of the index refuse it: the reader's file list and the expert store's key -> file map."""
    with pytest.raises(CheckpointError, match=match):
        checkpoint_files(root)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsReader(root)
    with pytest.raises(CheckpointError, match=match):
        _key_files(root)


def test_index_with_dotdot(model):
    _index(model, {"w": "../outside.safetensors"})
    _refused(model, r"model\.safetensors\.index\.json names shard '\.\./outside\.safetensors', which has a '\.\.' "
                    r"component; an index may only name files inside")


def test_index_with_absolute_path(model):
    _index(model, {"w": str(model.parent / "outside.safetensors")})
    _refused(model, r"index\.json names shard '/.*outside\.safetensors', which is an absolute path")


def test_index_with_symlink_outside(model):
    (model / "link.safetensors").symlink_to(model.parent / "outside.safetensors")
    _index(model, {"w": "link.safetensors"})
    _refused(model, r"names shard 'link\.safetensors', which resolves \(through a symlink\) to .*outside\.safetensors,"
                    r" outside the model directory")


def test_index_with_symlinked_folder_outside(model):
    (model / "sub").symlink_to(model.parent)
    _index(model, {"w": "sub/outside.safetensors"})
    _refused(model, r"names shard 'sub/outside\.safetensors', which resolves \(through a symlink\) to .* outside")


@pytest.mark.parametrize("weight_map", [["outside.safetensors"], "outside.safetensors", None])
def test_weight_map_not_an_object(model, weight_map):
    _index(model, weight_map)
    _refused(model, r"index\.json is not a valid index: its weight_map is (a JSON \w+|missing), not an object")


@pytest.mark.parametrize("name", [5, ["outside.safetensors"], None])
def test_shard_name_not_a_string(model, name):
    _index(model, {"w": name})
    _refused(model, r"index\.json names shard .*, which is a JSON \w+, not a string")


@pytest.mark.parametrize("name", ["", "."])
def test_empty_shard_name(model, name):
    _index(model, {"w": name})
    _refused(model, r"which is empty or holds a NUL byte")


def test_index_inside_the_directory_still_loads(model):
    """Shards in a subfolder or behind a symlink that stays inside, and Hugging Face's hub-cache layout
    (snapshots/<rev>/x -> ../../blobs/<hash>), are not escapes."""
    (model / "shards").mkdir()
    save_file({"a": torch.ones(3)}, str(model / "shards" / "a.safetensors"))
    (model / "b.safetensors").symlink_to(model / "shards" / "a.safetensors")
    _index(model, {"a": "shards/a.safetensors", "b": "b.safetensors"})
    assert checkpoint_files(model) == [model / "b.safetensors", model / "shards" / "a.safetensors"]

    repo = model.parent / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(repo / "blobs" / "f00d"))
    (repo / "snapshots" / "rev" / "model-1.safetensors").symlink_to("../../blobs/f00d")
    _index(repo / "snapshots" / "rev", {"w": "model-1.safetensors"})
    with SafetensorsReader(repo / "snapshots" / "rev") as reader:
        assert torch.equal(reader.read("w"), torch.arange(4.0))
