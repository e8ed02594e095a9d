"""Optimizer step time, state bytes per parameter and achieved memory bandwidth against a STREAM triad.

All variants update the same parameters (default 50M fp32 values in 10 tensors) with the same gradients, in
one process; rounds are interleaved and the median step is kept, so the ratios come from one run under the
same machine conditions. Bandwidth: bytes the update must move per parameter (fp32 AdamW: read p, g, m, v and
write p, m, v = 28 B; 8-bit states: 16 B; disk offload also reads and writes 12 B of swap file) divided by the
step time, against a triad a = b + s·c (STREAM's 12 B per element) measured here on the same threads.

    .venv/bin/python bench/optim.py                 # 50M parameters, ~2 min on 2 cores
    .venv/bin/python bench/optim.py --params 5e6    # smoke run

`offload-disk` is measured twice: with its swap files in the page cache (warm), and with them fsynced and
dropped from the cache before every step (cold: posix_fadvise DONTNEED), so it really reads from the disk.
bitsandbytes' AdamW8bit is timed too when it imports (a further baseline; its CPU path is not fused). Where the
CPU has the kernel's AVX-512 VBMI path, the same optimizer is also timed with the kernel built without VBMI (the
AVX-512 path with gathers, as on Skylake and Cascade Lake Xeons) and without AVX-512 (the AVX2 path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report  # noqa: E402

if TYPE_CHECKING:  # torch and memfit load in the functions: importing this file (bench/readme_check.py) stays cheap
    import torch

HYPER = dict(lr=1e-4, weight_decay=0.01)


def triad_gbs(n: int, repeats: int = 5) -> float:
    import torch

    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 12 * n / best / 1e9


def drop_cache(directory: Path) -> None:
    for path in directory.glob("*.swap"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


Hook = Callable[[], None]


def variants(params: list[torch.nn.Parameter], swap: Path) -> dict[str, tuple[torch.optim.Optimizer, int, Hook, Hook]]:
    """name -> (optimizer, bytes moved per parameter, hooks run untimed before and after each timed step)."""
    import torch

    from memfit.optim import AdamW8bit, OffloadAdamW, kernels

    none = lambda: None  # noqa: E731
    sync = os.sync  # the disk rows' dirty pages: their writeback would otherwise slow the rows after them

    def on_build(isa: str) -> type[AdamW8bit]:
        class OtherBuild(AdamW8bit):
            """The same optimizer stepping with another build of the kernel (kernels.ISA_FLAGS), for the comparison."""

            def step(self, closure=None):  # noqa: ANN001, ANN202
                os.environ["MEMFIT_KERNEL_ISA"] = isa
                try:
                    return super().step(closure)
                finally:
                    del os.environ["MEMFIT_KERNEL_ISA"]

        return OtherBuild

    out = {
        "torch AdamW foreach": (torch.optim.AdamW(params, foreach=True, **HYPER), 28, none, none),
        "torch AdamW fused": (torch.optim.AdamW(params, fused=True, **HYPER), 28, none, none),
        "memfit AdamW8bit": (AdamW8bit(params, **HYPER), 16, none, none),
    }
    # the other builds step next to the native one, before the disk rows (the row timed after those ran slower)
    if kernels.vector_path() == "avx512-vbmi":
        out["memfit AdamW8bit, AVX-512 path without VBMI"] = (on_build("avx512")(params, **HYPER), 16, none, none)
    if kernels.vector_path() in ("avx512-vbmi", "avx512"):
        out["memfit AdamW8bit, AVX2 path"] = (on_build("avx2")(params, **HYPER), 16, none, none)
    out |= {
        "offload-cpu": (OffloadAdamW(params, offload="cpu", **HYPER), 28, none, none),
        "offload-disk warm": (OffloadAdamW(params, offload="disk", path=swap / "warm", **HYPER), 28 + 24, none,
                              sync),
        "offload-disk cold": (OffloadAdamW(params, offload="disk", path=swap / "cold", durable=True, **HYPER), 28 + 24,
                              lambda: drop_cache(swap / "cold"), sync),
    }
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = (bnb.optim.AdamW8bit(params, **HYPER), 16, none, none)
    except Exception as e:  # noqa: BLE001 (any import or init failure means: no baseline here)
        print(f"bitsandbytes baseline skipped: {type(e).__name__}: {str(e)[:120]}")
    return out


def bitsandbytes_version() -> str | None:
    """The baseline's version, for the README's label (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


# README order and labels of the variants; a variant not listed here comes last under its own name
README_LABELS = {
    "torch AdamW foreach": "torch AdamW (foreach)",
    "torch AdamW fused": "torch AdamW (fused)",
    "memfit AdamW8bit": "**memfit AdamW8bit**",
    "memfit AdamW8bit, AVX-512 path without VBMI": "memfit AdamW8bit, AVX-512 without VBMI (gathers)",
    "memfit AdamW8bit, AVX2 path": "memfit AdamW8bit, AVX2 path (gathers)",
    "bitsandbytes AdamW8bit": "bitsandbytes AdamW8bit",
    "offload-cpu": "memfit offload-cpu",
    "offload-disk warm": "memfit offload-disk, swap in page cache",
    "offload-disk cold": "memfit offload-disk, cold (fsync + DONTNEED)",
}


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/optim.json alone (bench/readme_check.py compares the two)."""
    results = payload["results"]
    names = [n for n in README_LABELS if n in results] + [n for n in results if n not in README_LABELS]
    rows = []
    for name in names:
        r, label = results[name], README_LABELS.get(name, name)
        if name == "bitsandbytes AdamW8bit" and payload.get("bitsandbytes"):
            label += f" {payload['bitsandbytes']}"
        state = f"{r['state_bytes_per_param']:.2f}"
        if name.startswith("offload-disk") and r["state_bytes_per_param"] == 0:
            state = "0 (disk)"
        elif name == "memfit AdamW8bit":
            state = f"**{state}**"
        rows.append([label, f"{r['step_s'] * 1e3:.1f}", state, f"{r['moved_bytes_per_param']}",
                     f"{r['achieved_gbs']:.1f}", f"{r['of_triad']:.2f}", f"{r['vs_fused']:.2f}"])
    header = ["optimizer", "step ms", "state B/param (RAM)", "moved B/param", "GB/s", "÷ triad", "step ÷ fused AdamW"]
    return {"step": md_table(header, "lrrrrrr", rows)}


def main() -> None:
    import torch

    from memfit.optim import kernels
    from memfit.train.memory import optimizer_state_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6, help="total parameters (10 equal tensors)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed steps per variant")
    ap.add_argument("--name", default="optim", help="results file: results/NAME.json (e.g. optim-<cpu> to keep "
                                                     "another machine's run beside this one's)")
    args = ap.parse_args()
    n_each = int(args.params) // 10
    params = [torch.nn.Parameter(torch.randn(n_each) * 0.02) for _ in range(10)]
    for p in params:
        p.grad = torch.randn(n_each) * 1e-3
    n = n_each * 10
    with tempfile.TemporaryDirectory(prefix="memfit-optim-bench-", dir=os.environ.get("MEMFIT_SWAP_DIR")) as tmp:
        opts = variants(params, Path(tmp))
        for opt, *_ in opts.values():
            opt.step()  # warm-up: allocates states, writes swap version 0, builds the 8-bit kernel
        times: dict[str, list[float]] = {k: [] for k in opts}
        triads = []
        for _ in range(args.rounds):
            triads.append(triad_gbs(n))
            for name, (opt, _, before, after) in opts.items():
                before()
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
                after()
        triad = statistics.median(triads)
        fused = statistics.median(times["torch AdamW fused"])
        rows, results = [], {}
        for name, (opt, moved, *_) in opts.items():
            step = statistics.median(times[name])
            gbs = moved * n / step / 1e9
            r = results[name] = {"step_s": step, "state_bytes_per_param": optimizer_state_bytes(opt)[0] / n,
                                 "moved_bytes_per_param": moved, "achieved_gbs": gbs, "of_triad": gbs / triad,
                                 "vs_fused": step / fused, "all_s": times[name]}
            rows.append([name, step * 1e3, r["state_bytes_per_param"], moved, gbs, r["of_triad"], r["vs_fused"]])
    bnb = bitsandbytes_version() if "bitsandbytes AdamW8bit" in opts else None
    path = report(args.name, f"Optimizer step, {n / 1e6:.0f}M fp32 params, {torch.get_num_threads()} threads, "
                  f"triad {triad:.1f} GB/s", ["variant", "step ms", "state B/param (RAM)", "moved B/param", "GB/s",
                                              "÷ triad", "step ÷ fused"], rows,
                  {"params": n, "triad_gbs": triad, "triad_all": triads, "kernel": kernels.vector_path(),
                   "results": results, "bitsandbytes": bnb})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
