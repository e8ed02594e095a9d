"""Measuring a process's memory for the RSS tests: each measurement runs a test file as a script in a fresh
subprocess (its growth counts over its own Python + torch baseline, not the test session's) and samples
/proc/self/status.

The subprocess runs glibc's malloc with a fixed mmap threshold. By default the threshold grows after a large free,
so whether a tensor's pages come from a fresh mapping (returned on free) or from heap that is kept depends on what
ran before: the same MiniLM forward peaked anywhere from 57 to 78 MB above its weights from run to run. With the
threshold fixed, peaks repeat to within 0.5 MB, so a bound can be tight and still never flake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakAnon:
    """The peak of RssAnon (KiB) while the block runs, sampled every millisecond: anonymous memory only, so page
    cache of mapped files and shared libraries does not count."""

    def __enter__(self) -> PeakAnon:
        self.peak, self._stop = kib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, kib("RssAnon"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, kib("RssAnon"))


def run_script(script: str, *args: str, timeout: float = 300) -> dict:
    """Run `script` with `args` in a fresh process (fixed malloc thresholds) and return the JSON of its last line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **MALLOC_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
