"""The compiled 8-bit kernel is loaded only from a private cache, and only if its recorded hash matches."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from memfit import native
from memfit.optim import kernels

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
PLANTED = b"\x7fELF planted by someone else"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MEMFIT_NO_KERNEL", raising=False)
    kernels._load.cache_clear()
    yield tmp_path / "kernels"
    kernels._load.cache_clear()


def _built(cache: Path) -> list[Path]:
    return sorted(cache.glob("adamw8bit-*.so"))


def _record(so: Path) -> Path:
    return so.with_name(so.name + ".sha256")


def test_the_cache_is_created_private_and_each_build_records_its_hash(cache):
    old = os.umask(0o022)  # the usual umask, under which a plain mkdir would give 0755
    try:
        assert kernels.load() is not None
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (so,) = _built(cache)
    assert _record(so).read_text().strip() == hashlib.sha256(so.read_bytes()).hexdigest()


def test_a_recorded_kernel_is_reused_without_compiling(cache, monkeypatch):
    kernels.load()
    kernels._load.cache_clear()

    def no_compiler(*args, **kwargs):
        raise subprocess.SubprocessError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning would be an error
        assert kernels.load() is not None


def test_a_tampered_kernel_is_rebuilt_not_loaded(cache):
    kernels.load()
    (so,) = _built(cache)
    so.unlink()  # a new file, not a write into the one this process has mapped
    so.write_bytes(PLANTED)
    kernels._load.cache_clear()
    assert kernels.load() is not None  # a planted file could not even be loaded: this is a rebuilt one
    digest = hashlib.sha256(so.read_bytes()).hexdigest()
    assert digest != hashlib.sha256(PLANTED).hexdigest()
    assert _record(so).read_text().strip() == digest


def test_a_kernel_without_its_record_is_rebuilt(cache):
    kernels.load()
    (so,) = _built(cache)
    _record(so).unlink()
    before = so.stat().st_ino
    kernels._load.cache_clear()
    kernels.load()
    assert so.stat().st_ino != before and _record(so).read_text().strip() == hashlib.sha256(so.read_bytes()).hexdigest()


def test_a_cache_others_can_write_is_bypassed_not_trusted(cache, tmp_path, monkeypatch):
    """Chosen behaviour: a 0777 cache is not chmod-ed back (files planted meanwhile would stay) but bypassed: the
    kernel is built in a fresh private temporary directory. A file planted there under the kernel's name, with a
    matching record, is not loaded."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "probe"))  # learn the kernel's file name
    kernels.load()
    name = _built(tmp_path / "probe" / "kernels")[0].name
    kernels._load.cache_clear()
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    cache.mkdir()
    os.chmod(cache, 0o777)
    (cache / name).write_bytes(PLANTED)
    _record(cache / name).write_text(hashlib.sha256(PLANTED).hexdigest() + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = kernels.load()
    assert lib is not None  # loading the planted bytes would have failed
    assert any("not a private directory" in str(w.message) for w in caught)
    used = Path(lib._name).parent
    assert used != cache and stat.S_IMODE(used.stat().st_mode) == 0o700 and used.stat().st_uid == os.getuid()
    assert (cache / name).read_bytes() == PLANTED and stat.S_IMODE(cache.stat().st_mode) == 0o777  # left alone


def test_a_symlinked_cache_is_bypassed(cache, tmp_path):
    """A symlink in place of the cache directory could be swapped to point anywhere: not followed, even to a
    private directory of ours."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache.symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match="not a private directory"):
        lib = kernels.load()
    assert lib is not None and _built(elsewhere) == [] and Path(lib._name).parent != elsewhere
