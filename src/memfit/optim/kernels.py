"""A fused CPU kernel for the 8-bit AdamW update, compiled once with the system C compiler and called by ctypes.

Why not torch ops: the update is ~20 elementwise passes plus four table lookups per value; as separate torch
ops it runs ~40x slower than torch's fused AdamW on CPU, and torch.compile's generated C++ (indirect loads,
a recomputed reduction) was still ~9x slower here. One pass over each 256-value block does it all.

Speed: the update itself is bound by the divider (two divisions and a square root per value, as in torch's
fused AdamW); the rest is four table lookups per value, which GCC does not vectorise by itself (it emulates
gathers). The AVX2 path gathers explicitly, finds codes by the direct search of `memfit.optim.quant` (no
search loop, no 64 KB table), and is software-pipelined: block b is decoded and updated while block b-1, whose
new absmax is known by then, is requantised, so the lookups of one overlap the divider of the other; the next
block's lines are prefetched. Without AVX2 (or with `scalar=True`) plain C runs the same maths value by value:
both give bitwise the same states (`tests/test_optim_adamw8bit.py`), and the same as the earlier
table-lookup kernel they replace (2.4x faster on one thread here).

Building and caching: `memfit.native` (a private, hash-checked cache). Without a working compiler, `load()` returns
None and the optimizer falls back to chunked torch ops (same maths, slower).
Threads: ctypes releases the GIL, so a small thread pool splits the blocks across `torch.get_num_threads()`.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

from memfit.errors import CheckpointError
from memfit.native import compile_library
from memfit.optim.quant import BLOCK, E_LO, EXPONENTS, QuantTables

SOURCE = r"""#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* hp: 1-beta1, beta2, 1-beta2, 1-lr*wd, -lr/bc1, sqrt(bc2), eps */
typedef struct { float w1, beta2, w2, decay, neg_step, bc2s, eps; } Hyper;

/* Direct search (memfit.optim.quant): integer ops on the value's bits give a row of a small table, and one
   comparison of the low 16 bits finishes the rounding. */
static inline uint8_t quant(float x, const int32_t* restrict direct) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint32_t sign = bits >> 31;
    int32_t e = (int32_t)((bits >> 23) & 0xFFu) - E_LO;
    e = e < 0 ? 0 : (e > EXPONENTS - 1 ? EXPONENTS - 1 : e);
    const uint32_t entry = (uint32_t)direct[((sign * EXPONENTS + (uint32_t)e) << 7) | ((bits >> 16) & 0x7Fu)];
    const uint32_t key = (bits & 0xFFFFu) ^ (0xFFFFu * sign);
    return (uint8_t)((entry & 0xFFu) + (key > (entry >> 8)));
}

static inline uint32_t absbits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b & 0x7FFFFFFFu;
}

static inline float frombits(uint32_t b) {
    float x;
    memcpy(&x, &b, 4);
    return x;
}

/* One block of any length, value by value: the reference the vector path reproduces bit for bit. */
static void block_scalar(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                         uint8_t* restrict vq, float* restrict va, int len, const float* restrict mmap,
                         const int32_t* restrict mdirect, const float* restrict vmap, const int32_t* restrict vdirect,
                         Hyper h) {
    float m[BLOCK], v[BLOCK];
    uint32_t mmax = 0, vmax = 0;  /* max over the bits of non-negative floats */
    for (int k = 0; k < len; k++) {
        const float gi = g[k], m0 = mmap[mq[k]] * *ma, v0 = vmap[vq[k]] * *va;
        const float mi = m0 + h.w1 * (gi - m0);
        const float vi = v0 * h.beta2 + h.w2 * gi * gi;
        const float denom = sqrtf(vi) / h.bc2s + h.eps;
        p[k] = p[k] * h.decay + h.neg_step * (mi / denom);
        m[k] = mi;
        v[k] = vi;
        mmax = absbits(mi) > mmax ? absbits(mi) : mmax;
        uint32_t vb;
        memcpy(&vb, &vi, 4);
        vmax = vb > vmax ? vb : vmax;  /* v >= 0 */
    }
    const float fm = frombits(mmax), fv = frombits(vmax);
    const float im = fm > 0.0f ? 1.0f / fm : 0.0f, iv = fv > 0.0f ? 1.0f / fv : 0.0f;
    for (int k = 0; k < len; k++) mq[k] = quant(m[k] * im, mdirect);
    for (int k = 0; k < len; k++) vq[k] = quant(v[k] * iv, vdirect);
    *ma = fm;
    *va = fv;
}

#ifdef __AVX2__
static inline __m256 decode8(const uint8_t* codes, const float* map, __m256 scale) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)codes));
    return _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), scale);
}

/* Codes of 8 values as 32-bit lanes whose low byte is the code (the high bytes are dropped when packing). */
static inline __m256i encode8(__m256 x, const int32_t* direct) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i neg = _mm256_srai_epi32(bits, 31);
    /* exponent and top 7 mantissa bits together, clamped to the table's rows: one range, no separate fields */
    __m256i t = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x7FFF)),
                                 _mm256_set1_epi32(E_LO << 7));
    t = _mm256_min_epi32(_mm256_max_epi32(t, _mm256_setzero_si256()), _mm256_set1_epi32((EXPONENTS << 7) - 1));
    const __m256i idx = _mm256_add_epi32(t, _mm256_and_si256(neg, _mm256_set1_epi32(EXPONENTS << 7)));
    const __m256i entry = _mm256_i32gather_epi32(direct, idx, 4);
    const __m256i key = _mm256_and_si256(_mm256_xor_si256(bits, neg), _mm256_set1_epi32(0xFFFF));
    return _mm256_sub_epi32(entry, _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 8)));  /* j + (key > thr) */
}

static inline void store8(__m256i code, uint8_t* codes) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, pick),
                                                       _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
    _mm_storel_epi64((__m128i*)codes, _mm256_castsi256_si128(packed));
}

static inline uint32_t hmax(__m256i x) {
    __m128i y = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    y = _mm_max_epu32(y, _mm_shuffle_epi32(y, 0x4E));
    y = _mm_max_epu32(y, _mm_shuffle_epi32(y, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(y);
}
#endif

/* Blocks [b0, b1) of a tensor of rows of `row` values (a flat tensor is one row); a block never crosses a row.
   Vector path: software-pipelined over full blocks. While block b is decoded and updated (the update is
   bound by the divider: two divisions and a square root per value), block b-1, whose absmax is now known, is
   requantised from a second buffer, so the gathers and integer work of one overlap the divider of the other. */
void adamw8bit_blocks(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                      uint8_t* restrict vq, float* restrict va, int64_t row, int64_t b0, int64_t b1,
                      const float* restrict mmap, const int32_t* restrict mdirect,
                      const float* restrict vmap, const int32_t* restrict vdirect, const float* restrict hp) {
    const Hyper h = {hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]};
    const int64_t per_row = (row + BLOCK - 1) / BLOCK;
#ifdef __AVX2__
    float buf[2][2][BLOCK] __attribute__((aligned(32)));  /* [block parity][m, v] */
    int64_t pend = -1;  /* start of the block waiting to be requantised, -1: none */
    int pend_par = 0;
    float pend_im = 0.0f, pend_iv = 0.0f;
    const __m256 w1 = _mm256_set1_ps(h.w1), beta2 = _mm256_set1_ps(h.beta2), w2 = _mm256_set1_ps(h.w2);
    const __m256 decay = _mm256_set1_ps(h.decay), neg_step = _mm256_set1_ps(h.neg_step);
    const __m256 bc2s = _mm256_set1_ps(h.bc2s), eps = _mm256_set1_ps(h.eps);
    const __m256i nosign = _mm256_set1_epi32(0x7FFFFFFF);
#endif
    for (int64_t b = b0; b < b1; b++) {
        const int64_t r = b / per_row, col = (b - r * per_row) * BLOCK, s = r * row + col;
        const int len = (row - col < BLOCK) ? (int)(row - col) : BLOCK;
#ifdef __AVX2__
        if (len == BLOCK) {
            const int par = pend_par ^ 1;
            float* restrict m = buf[par][0];
            float* restrict v = buf[par][1];
            const float* restrict pm = buf[pend_par][0];
            const float* restrict pv = buf[pend_par][1];
            const __m256 am = _mm256_set1_ps(ma[b]), av = _mm256_set1_ps(va[b]);
            const __m256 pim = _mm256_set1_ps(pend_im), piv = _mm256_set1_ps(pend_iv);
            __m256i mmax = _mm256_setzero_si256(), vmax = _mm256_setzero_si256();
            if (b + 1 < b1) {  /* the next block's lines: with the hardware prefetcher alone ~1/5 of the time stalls */
                const int64_t ahead = s + BLOCK;
                for (int c = 0; c < BLOCK; c += 16) {
                    __builtin_prefetch(p + ahead + c, 1);
                    __builtin_prefetch(g + ahead + c, 0);
                }
                for (int c = 0; c < BLOCK; c += 64) {
                    __builtin_prefetch(mq + ahead + c, 1);
                    __builtin_prefetch(vq + ahead + c, 1);
                }
            }
            for (int k = 0; k < BLOCK; k += 8) {
                const __m256 gi = _mm256_loadu_ps(g + s + k);
                const __m256 m0 = decode8(mq + s + k, mmap, am), v0 = decode8(vq + s + k, vmap, av);
                const __m256 mi = _mm256_add_ps(m0, _mm256_mul_ps(w1, _mm256_sub_ps(gi, m0)));
                const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(_mm256_mul_ps(w2, gi), gi));
                const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2s), eps);
                const __m256 pk = _mm256_loadu_ps(p + s + k);
                _mm256_storeu_ps(p + s + k, _mm256_add_ps(_mm256_mul_ps(pk, decay),
                                                          _mm256_mul_ps(neg_step, _mm256_div_ps(mi, denom))));
                _mm256_store_ps(m + k, mi);
                _mm256_store_ps(v + k, vi);
                mmax = _mm256_max_epu32(mmax, _mm256_and_si256(_mm256_castps_si256(mi), nosign));
                vmax = _mm256_max_epu32(vmax, _mm256_castps_si256(vi));
                if (pend >= 0) {
                    store8(encode8(_mm256_mul_ps(_mm256_load_ps(pm + k), pim), mdirect), mq + pend + k);
                    store8(encode8(_mm256_mul_ps(_mm256_load_ps(pv + k), piv), vdirect), vq + pend + k);
                }
            }
            const float fm = frombits(hmax(mmax)), fv = frombits(hmax(vmax));
            ma[b] = fm;
            va[b] = fv;
            pend = s;
            pend_par = par;
            pend_im = fm > 0.0f ? 1.0f / fm : 0.0f;
            pend_iv = fv > 0.0f ? 1.0f / fv : 0.0f;
            continue;
        }
#endif
        block_scalar(p + s, g + s, mq + s, ma + b, vq + s, va + b, len, mmap, mdirect, vmap, vdirect, h);
    }
#ifdef __AVX2__
    if (pend >= 0) {
        const __m256 pim = _mm256_set1_ps(pend_im), piv = _mm256_set1_ps(pend_iv);
        for (int k = 0; k < BLOCK; k += 8) {
            store8(encode8(_mm256_mul_ps(_mm256_load_ps(buf[pend_par][0] + k), pim), mdirect), mq + pend + k);
            store8(encode8(_mm256_mul_ps(_mm256_load_ps(buf[pend_par][1] + k), piv), vdirect), vq + pend + k);
        }
    }
#endif
}
"""

FLAGS = [f"-DBLOCK={BLOCK}", f"-DE_LO={E_LO}", f"-DEXPONENTS={EXPONENTS}"]
MIN_PARALLEL_BLOCKS = 256  # below ~64K values one thread is faster than a hand-off


@cache
def load(scalar: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when no C compiler works here. `scalar`: without the AVX2
    path (the reference the tests hold the vector path to)."""
    lib = compile_library("adamw8bit", SOURCE, FLAGS + ["-mno-avx2"] * scalar, "the 8-bit AdamW step")
    if lib is None:
        return None
    fn = lib.adamw8bit_blocks
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5
    return lib


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="memfit-adamw8bit")


def adamw8bit_step(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ma: torch.Tensor, vq: torch.Tensor,
                   va: torch.Tensor, hp: torch.Tensor, tm: QuantTables, tv: QuantTables, row: int) -> None:
    """Update flat contiguous CPU tensors in place: p, g fp32 [n]; mq, vq uint8 [n]; ma, va fp32 [nb]; hp fp32 [7].
    Blocks run along rows of `row` values (`row` = n for one flat run of blocks). The C code trusts every size, so
    they are checked here first (a state loaded from a checkpoint may not fit its parameter)."""
    n = p.numel()
    nb = (n // row) * -(-row // BLOCK) if row else 0
    sizes = {"p": (p, torch.float32, n), "g": (g, torch.float32, n), "exp_avg_q": (mq, torch.uint8, n),
             "exp_avg_sq_q": (vq, torch.uint8, n), "exp_avg_absmax": (ma, torch.float32, nb),
             "exp_avg_sq_absmax": (va, torch.float32, nb), "hp": (hp, torch.float32, 7)}
    for name, (t, dtype, size) in sizes.items():
        if t.dtype != dtype or t.numel() != size or not t.is_contiguous() or t.device.type != "cpu":
            raise CheckpointError(f"8-bit AdamW kernel: {name} must be a contiguous CPU {dtype} tensor of {size} "
                                  f"values, got {t.dtype} {list(t.shape)} on {t.device}; the optimizer state does not "
                                  "fit its parameter (resume with the run's own checkpoint).")
    if row <= 0 or n % row:
        raise CheckpointError(f"8-bit AdamW kernel: {n} values do not split into rows of {row}.")
    fn = load().adamw8bit_blocks
    ptrs = [t.data_ptr() for t in (p, g, mq, ma, vq, va)]
    tables = [t.data_ptr() for t in (tm.qmap, tm.direct, tv.qmap, tv.direct, hp)]
    threads = min(torch.get_num_threads(), max(1, nb // MIN_PARALLEL_BLOCKS))
    if threads == 1:
        fn(*ptrs, row, 0, nb, *tables)
        return
    bounds = [nb * i // threads for i in range(threads + 1)]
    pool = _pool(threads)
    futures = [pool.submit(fn, *ptrs, row, lo, hi, *tables) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    for f in futures:
        f.result()
