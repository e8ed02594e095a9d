"""The CPU dequantization kernel: a range of a quantized weight's values into an fp32 buffer, for the tiled
matmul of `memfit.quant.linear` (built and cached by `memfit.native`).

out[i - lo] = codebook[index(i)] * absmax[i / block] for i in [lo, hi): the torch reference's arithmetic (one fp32
multiply; a double-quantized absmax decoded per block as `unpack_scales` does), so both give bitwise the same
values. With AVX2, whole blocks of a multiple of 16 values are decoded 16
at a time: NF4 looks its 16-entry codebook up with two in-register permutes (no memory gathers) and interleaves
the high and low nibbles; int8 gathers from its 256-entry codebook. Everything else runs value by value.
"""

from __future__ import annotations

import ctypes
from functools import cache

from memfit.native import compile_library

SOURCE = r"""#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* A block's absmax: stored in fp32, or double-quantized (an 8-bit code of a 256-value map, times its group's
   scale, plus the offset: the order of operations of memfit.quant.blockwise.unpack_scales). */
typedef struct { const float *absmax; const uint8_t *codes; const float *map, *scale; float offset; } Scales;

static inline float absmax_of(const Scales *s, int64_t b) {
    return s->absmax ? s->absmax[b] : s->map[s->codes[b]] * s->scale[b / 256] + s->offset;
}

static inline int index_of(const uint8_t *codes, int bits, int64_t i) {
    return bits == 8 ? codes[i] : (i & 1 ? codes[i >> 1] & 15 : codes[i >> 1] >> 4);
}

static void scalar(const uint8_t *codes, const Scales *s, const float *book, int bits, int64_t block,
                   int64_t lo, int64_t hi, float *out) {
    for (int64_t i = lo; i < hi; i++) out[i - lo] = book[index_of(codes, bits, i)] * absmax_of(s, i / block);
}

#ifdef __AVX2__
static inline __m256 lookup16(__m256i idx, __m256 t0, __m256 t1) {
    __m256 a = _mm256_permutevar8x32_ps(t0, idx), b = _mm256_permutevar8x32_ps(t1, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  /* bit 3 picks t1 */
}

/* one whole block [start, start + block), start even, block % 16 == 0 */
static void block4(const uint8_t *codes, float scale, const float *book, int64_t start, int64_t block, float *out) {
    __m256 t0 = _mm256_loadu_ps(book), t1 = _mm256_loadu_ps(book + 8), s = _mm256_set1_ps(scale);
    const uint8_t *c = codes + (start >> 1);
    for (int64_t k = 0; k < block; k += 16) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + (k >> 1))));
        __m256 hi = lookup16(_mm256_srli_epi32(bytes, 4), t0, t1);
        __m256 lo = lookup16(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), t0, t1);
        __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo);
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x20), s));
        _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x31), s));
    }
}

static void block8(const uint8_t *codes, float scale, const float *book, int64_t start, int64_t block, float *out) {
    __m256 s = _mm256_set1_ps(scale);
    for (int64_t k = 0; k < block; k += 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + start + k)));
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_i32gather_ps(book, idx, 4), s));
    }
}
#endif

void dequant_range(const uint8_t *codes, const float *absmax, const uint8_t *absmax_codes, const float *absmax_map,
                   const float *absmax_scale, float absmax_offset, const float *book, int64_t bits, int64_t block,
                   int64_t lo, int64_t hi, float *out) {
    Scales sc = {absmax, absmax_codes, absmax_map, absmax_scale, absmax_offset}, *s = &sc;
#ifdef __AVX2__
    if (block % 16 == 0) {
        int64_t first = (lo + block - 1) / block * block, last = hi / block * block;  /* whole blocks inside */
        if (first >= last) { scalar(codes, s, book, (int)bits, block, lo, hi, out); return; }
        scalar(codes, s, book, (int)bits, block, lo, first, out);
        for (int64_t b = first; b < last; b += block) {
            if (bits == 4) block4(codes, absmax_of(s, b / block), book, b, block, out + (b - lo));
            else block8(codes, absmax_of(s, b / block), book, b, block, out + (b - lo));
        }
        scalar(codes, s, book, (int)bits, block, last, hi, out + (last - lo));
        return;
    }
#endif
    scalar(codes, s, book, (int)bits, block, lo, hi, out);
}
"""


@cache
def load(scalar: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel, or None when no C compiler works here. `scalar`: without the AVX2 path (the tests'
    reference for the vector path)."""
    lib = compile_library("dequant", SOURCE, ["-mno-avx2"] * scalar, "quantized matmul")
    if lib is None:
        return None
    lib.dequant_range.restype = None
    lib.dequant_range.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_void_p] + [ctypes.c_int64] * 4
                                  + [ctypes.c_void_p])
    return lib
