"""The 8-bit kernel's vector encoder against the direct search on every fp32 bit pattern (2^32 per map).

A correctness check, not a benchmark: the tests sweep every 331st pattern and every tie; this covers the rest,
for a change to `memfit.optim.quant.encoder_table` or the kernel's encoder. On the AVX-512 VBMI path both ways
of reading the midpoints are checked (byte permutes, and the gathers m takes on Intel); the "avx512" build reads
them by gathers alone. On a CPU without AVX-512 the kernel's encoder is the direct search itself and the check is
trivially true (it says so).

    .venv/bin/python bench/encoder_exhaustive.py     # ~6 min on 2 cores; prints the mismatches per map
    MEMFIT_KERNEL_ISA=avx512 .venv/bin/python bench/encoder_exhaustive.py    # the path without VBMI, ~6 min
"""

from __future__ import annotations

import sys
import time

CHUNK = 1 << 26


def main() -> None:
    import torch

    from memfit.optim import kernels
    from memfit.optim.quant import quantize_normalized, tables

    lib = kernels.load()
    if lib is None:
        sys.exit("no C compiler: the kernel is not built here")
    path = kernels.vector_path()
    print(f"kernel path: {path}")
    reads = {"avx512-vbmi": {"byte permutes": 0, "gathers": 1}, "avx512": {"gathers": 1}}.get(path,
                                                                                           {"direct search": 0})
    bad_total = 0
    for signed in (True, False):
        t, bad, t0 = tables(signed), dict.fromkeys(reads, 0), time.perf_counter()
        out = torch.empty(CHUNK, dtype=torch.uint8)
        for lo in range(-(1 << 31), 1 << 31, CHUNK):
            x = torch.arange(lo, lo + CHUNK, dtype=torch.int64).to(torch.int32).view(torch.float32)
            expected = quantize_normalized(x, t)
            for read, gathers in reads.items():
                lib.encode_values(x.data_ptr(), out.data_ptr(), CHUNK, t.direct.data_ptr(), t.encoder.data_ptr(),
                                  signed, gathers)
                wrong = out != expected
                if wrong.any():
                    bad[read] += int(wrong.sum())
                    first = wrong.nonzero()[:3, 0]
                    print(f"  {read}, e.g. {x[first].tolist()}: {out[first].tolist()}, expected "
                          f"{expected[first].tolist()}")
        counts = ", ".join(f"{read}: {n}" for read, n in bad.items())
        print(f"{'signed' if signed else 'unsigned'} map: mismatches in 2^32 patterns, {counts} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        bad_total += sum(bad.values())
    sys.exit(1 if bad_total else 0)


if __name__ == "__main__":
    main()
