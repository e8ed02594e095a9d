"""The 8-bit kernel's vector encoder against the direct search on every fp32 bit pattern (2^32 per map).

A correctness check, not a benchmark: the tests sweep every 331st pattern and every tie; this covers the rest,
for a change to `memfit.optim.quant.encoder_table` or the kernel's encoder. On a CPU without the AVX-512 VBMI path
the kernel's encoder is the direct search itself and the check is trivially true (it says so).

    .venv/bin/python bench/encoder_exhaustive.py     # ~6 min on 2 cores; prints the mismatches per map
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
    print(f"kernel path: {kernels.vector_path()}")
    bad_total = 0
    for signed in (True, False):
        t, bad, t0 = tables(signed), 0, time.perf_counter()
        out = torch.empty(CHUNK, dtype=torch.uint8)
        for lo in range(-(1 << 31), 1 << 31, CHUNK):
            x = torch.arange(lo, lo + CHUNK, dtype=torch.int64).to(torch.int32).view(torch.float32)
            lib.encode_values(x.data_ptr(), out.data_ptr(), CHUNK, t.direct.data_ptr(), t.encoder.data_ptr(), signed)
            wrong = out != quantize_normalized(x, t)
            if wrong.any():
                bad += int(wrong.sum())
                first = wrong.nonzero()[:3, 0]
                print(f"  e.g. {x[first].tolist()}: {out[first].tolist()}, expected "
                      f"{quantize_normalized(x[first], t).tolist()}")
        print(f"{'signed' if signed else 'unsigned'} map: {bad} mismatches in 2^32 patterns "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        bad_total += bad
    sys.exit(1 if bad_total else 0)


if __name__ == "__main__":
    main()
