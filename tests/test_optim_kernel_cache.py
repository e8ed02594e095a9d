"""The compiled 8-bit kernel is loaded only from a private cache, and only if its recorded hash matches."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import warnings

import pytest

from memfit.optim import kernels

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MEMFIT_NO_KERNEL", raising=False)
    kernels.load.cache_clear()
    yield tmp_path / "kernels"
    kernels.load.cache_clear()


def _built(cache) -> list:
    return sorted(cache.glob("adamw8bit-*.so"))


def test_the_cache_is_created_private_and_each_build_records_its_hash(cache):
    assert kernels.load() is not None
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (so,) = _built(cache)
    record = so.with_name(so.name + ".sha256").read_text().strip()
    assert record == hashlib.sha256(so.read_bytes()).hexdigest()


def test_a_tampered_kernel_is_rebuilt_not_loaded(cache):
    kernels.load()
    (so,) = _built(cache)
    so.unlink()  # a new file, not a write into the one this process has mapped
    so.write_bytes(b"\x7fELF planted by someone else")
    kernels.load.cache_clear()
    assert kernels.load() is not None  # a planted file could not even be loaded: this is a rebuilt one
    digest = hashlib.sha256(so.read_bytes()).hexdigest()
    assert so.read_bytes() != b"\x7fELF planted by someone else"
    assert so.with_name(so.name + ".sha256").read_text().strip() == digest


def test_a_kernel_without_its_record_is_rebuilt(cache):
    kernels.load()
    (so,) = _built(cache)
    so.with_name(so.name + ".sha256").unlink()
    before = so.stat().st_ino
    kernels.load.cache_clear()
    kernels.load()
    assert so.stat().st_ino != before and so.with_name(so.name + ".sha256").is_file()


def test_a_cache_others_can_write_is_not_used(cache):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.load() is not None
    assert any("not a private directory" in str(w.message) for w in caught)
    assert _built(cache) == []  # built elsewhere (a fresh 0700 temporary directory)
