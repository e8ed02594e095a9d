"""A fused CPU kernel for the 8-bit AdamW update, compiled once with the system C compiler and called by ctypes.

Why not torch ops: the update is ~20 elementwise passes plus four table lookups per value; as separate torch
ops it runs ~40x slower than torch's fused AdamW on CPU, and torch.compile's generated C++ (indirect loads,
a recomputed reduction) was still ~9x slower here. One pass over each 256-value block does it all.

Speed: the divider and the table lookups bound it. torch's fused AdamW divides twice per value, by sqrt(bc2) and
by the denominator, and takes a square root. Here the first is a multiply by its reciprocal, and the vector paths
replace the second by the CPU's reciprocal estimate and one correction of the quotient (within an ulp or two of
the division): on Zen 4 each change took a fifth off the step, since the divider is shared with the square root
and the encoder. Only p uses them, so p may differ from torch's formula, and from the scalar build, in its last
bits; the states never do. The rest is four table lookups per value (decode m and v, encode them again), which
GCC does not vectorise by itself. Four paths, chosen by what `-march=native` offers, all bitwise the same states:
- AVX-512 with VBMI (Zen 4, Ice Lake and later). Encoding is search-free: a bound of the code from the value's
  top 16 bits, 32 values per vector in 16-bit lanes (within a binade the map is linear in those bits, but where
  a decade begins: one or two lines of 16-bit fixed point per binade, fitted and checked on all 65,536 keys by
  `memfit.optim.quant.encoder_table`), then one exact comparison with the midpoint above it. It replaced a bound
  computed per value in 32-bit lanes (a decade lookup and one fused multiply-add), which took twice the
  operations and a third of the step. The map's entries and the midpoints are read from four byte planes by byte
  permutes, 64 codes at a time: on AMD every lookup (its gathers cost ~10 cycles per 8 values on Zen 4), on Intel
  v's, while m's take 16-value gathers that use the idle load ports (`blocks_avx512`). Checked against the direct
  search on all 2^32 fp32 bit patterns of both maps, both ways (`bench/encoder_exhaustive.py`; the tests sweep
  every 331st pattern, every key's bin edges and every tie).
- AVX-512 without VBMI (Skylake and Cascade Lake Xeons; the "avx512" build elsewhere): the same, every lookup by
  gathers.
- AVX2: gathers, and the direct search of `memfit.optim.quant` (one gather per code, no search loop).
- Without AVX2 (or the "scalar" build, `load("scalar")`) plain C runs the same maths value by value: the
  reference the tests hold the vector paths to (`tests/test_optim_adamw8bit.py`).
The vector paths are software-pipelined: block b is decoded and updated while block b-1, whose new absmax is
known by then, is requantised, so the lookups of one overlap the divider of the other; they prefetch blocks
ahead (the AVX-512 path not on AMD, where the hardware prefetcher alone was faster).

Building and caching: `memfit.native` (a private, hash-checked cache). Without a working compiler, `load()` returns
None and the optimizer falls back to chunked torch ops (same maths, slower).
Threads: one call updates every 8-bit tensor of a step (`adamw8bit_steps`), their blocks laid end to end and split
evenly across `torch.get_num_threads()` threads of torch's own OpenMP runtime (built with -fopenmp, the kernel
binds to the libgomp torch loaded, so no second team competes with torch's spinning workers for the cores: on 2
cores that cost ~20% of a step that follows a torch op); without OpenMP, ctypes releases the GIL and a small
Python thread pool splits them the same way. One call a step rather than one per tensor: each call cost ~60 µs
of region start, thread imbalance and Python (6 ms a step at 100 tensors of 500K values).
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

from memfit.errors import CheckpointError, ConfigError
from memfit.native import compile_library
from memfit.optim.quant import BLOCK, E_LO, ENC_LAYOUT, EXPONENTS, QuantTables

TEMPLATE = r"""#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* hp: 1-beta1, beta2, 1-beta2, 1-lr*wd, -lr/bc1, 1/sqrt(bc2), eps */
typedef struct { float w1, beta2, w2, decay, neg_step, ibc2s, eps; } Hyper;

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

/* The lines of the block at `at`, fetched while an earlier one is updated (the gather path: with the hardware
   prefetcher alone ~1/5 of its time stalled). */
static inline void prefetch_block(const float* p, const float* g, const uint8_t* mq, const uint8_t* vq, int64_t at) {
    for (int c = 0; c < BLOCK; c += 16) {
        __builtin_prefetch(p + at + c, 1);
        __builtin_prefetch(g + at + c, 0);
    }
    for (int c = 0; c < BLOCK; c += 64) {
        __builtin_prefetch(mq + at + c, 1);
        __builtin_prefetch(vq + at + c, 1);
    }
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
        const float denom = sqrtf(vi) * h.ibc2s + h.eps;
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

/* a * b + c, fused where the CPU has FMA: for p's update only (p is no state) */
static inline __m256 madd8(__m256 a, __m256 b, __m256 c) {
#ifdef __FMA__
    return _mm256_fmadd_ps(a, b, c);
#else
    return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

/* a / d without the divider: the 12-bit reciprocal estimate, then one correction of the quotient from its
   residual (q + r(a - dq), with FMA), within an ulp or two of the division; p is the only output that uses it */
static inline __m256 quot8(__m256 a, __m256 d) {
#ifdef __FMA__
    const __m256 r = _mm256_rcp_ps(d);
    const __m256 q = _mm256_mul_ps(a, r);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(d, q, a), r, q);
#else
    return _mm256_div_ps(a, d);
#endif
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define AVX512_PATH 1
#ifdef __AVX512VBMI__
#define BYTE_PERMUTES 1
#endif
/* AVX-512 path. Encoding computes a bound of each code from the value's top 16 bits, 32 values per vector in
   16-bit lanes (memfit.optim.quant.encoder_table), and finishes with one exact comparison against the midpoint
   above it. The map's entries and the midpoints are read one of two ways: with VBMI from four byte planes (byte k
   of every entry, 256 bytes each: two two-table byte permutes and a blend give one byte of 64 values),
   interleaved into fp32; or by 16-value gathers from the fp32 tables (without VBMI every lookup, with it m's on
   Intel: see blocks_avx512). */
typedef struct {
    __m512i edge, a0, a1, b0, b1, neg;  /* 16-bit lanes: per binade EDGE; per segment A and B (64 each) */
    const float* mids;  /* the fp32 midpoints, +inf appended (for the gathers) */
#ifdef BYTE_PERMUTES
    __m512i map[4][4], mid[4][4];  /* byte planes: [byte of the fp32 value][64-entry quarter] */
#endif
} Enc;

static const uint16_t HIGH_WORDS[32] = {HIGH_INIT};  /* the top half of each dword of two vectors */
#ifdef BYTE_PERMUTES
/* Byte i of 64 codes is placed at i' so that the in-lane unpacks below return values 16q..16q+15 in vector q:
   ORDER[16L + 4q + r] = 16q + 4L + r (its own inverse). */
static const uint8_t ORDER[64] = {ORDER_INIT};
static const uint8_t PACK[64] = {PACK_INIT};  /* low bytes of the words of two vectors, into ORDER's places */
static const uint8_t LOW_BYTES[64] = {LOW_INIT};  /* the low byte of each word of two vectors, in natural order */
#endif

/* Whether m's lookups (decoding, and the encoder's midpoints) take 16-value gathers instead of byte permutes: -1
   chooses by the CPU (see blocks_avx512), 0 and 1 force one way (the tests run both). Without VBMI, always. */
static int m_gathers_mode = -1;

static int m_gathers(void) {
#ifdef BYTE_PERMUTES
    return m_gathers_mode < 0 ? !__builtin_cpu_is("amd") : m_gathers_mode;
#else
    return 1;
#endif
}

int set_m_gathers(int mode) {
    m_gathers_mode = mode;
    return m_gathers();
}

static void enc_load(Enc* v, const uint8_t* table) {
    const uint16_t* h = (const uint16_t*)table;
    v->edge = _mm512_loadu_si512(h + 2 * ENC_EDGE);
    v->a0 = _mm512_loadu_si512(h + 2 * ENC_A);
    v->a1 = _mm512_loadu_si512(h + 2 * ENC_A + 32);
    v->b0 = _mm512_loadu_si512(h + 2 * ENC_B);
    v->b1 = _mm512_loadu_si512(h + 2 * ENC_B + 32);
    v->neg = _mm512_set1_epi16((short)((const int32_t*)table)[ENC_NEG]);
    v->mids = (const float*)(table + ENC_MIDS);
#ifdef BYTE_PERMUTES
    const uint8_t* planes = table + 4 * ENC_INTS;
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) {
            v->map[k][j] = _mm512_loadu_si512(planes + 256 * k + 64 * j);
            v->mid[k][j] = _mm512_loadu_si512(planes + 1024 + 256 * k + 64 * j);
        }
#endif
}

#ifdef BYTE_PERMUTES
/* 64 fp32 table entries for 64 codes already in ORDER's places, as four vectors in natural order. */
static inline void lookup64(__m512i codes, const __m512i planes[4][4], __m512i out[4]) {
    const __mmask64 high = _mm512_movepi8_mask(codes);
    __m512i b[4];
    for (int k = 0; k < 4; k++)
        b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(planes[k][0], codes, planes[k][1]),
                                      _mm512_permutex2var_epi8(planes[k][2], codes, planes[k][3]));
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_unpacklo_epi16(lo01, lo23);
    out[1] = _mm512_unpackhi_epi16(lo01, lo23);
    out[2] = _mm512_unpacklo_epi16(hi01, hi23);
    out[3] = _mm512_unpackhi_epi16(hi01, hi23);
}

#endif

/* The map's entries for 64 codes times scale: byte permutes of its planes, or (`gathers`, a constant where
   inlined) four 16-value gathers from the fp32 map. */
static inline void decode64(const uint8_t* codes, const Enc* v, const float* map, __m512 scale, __m512 out[4],
                            const int gathers) {
#ifdef BYTE_PERMUTES
    if (!gathers) {
        __m512i raw[4];
        lookup64(_mm512_permutexvar_epi8(_mm512_loadu_si512(ORDER), _mm512_loadu_si512(codes)), v->map, raw);
        for (int q = 0; q < 4; q++) out[q] = _mm512_mul_ps(_mm512_castsi512_ps(raw[q]), scale);
        return;
    }
#else
    (void)v;
    (void)gathers;
#endif
    for (int q = 0; q < 4; q++) {
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + 16 * q)));
        out[q] = _mm512_mul_ps(_mm512_i32gather_ps(idx, map, 4), scale);
    }
}

/* c0 of 32 values from their keys (top 16 bits), with c0 <= code <= c0 + 1: memfit.optim.quant.encoder_bound,
   step for step. `is_signed` is a constant where inlined. */
static inline __m512i code_bound32(__m512i key, const Enc* v, const int is_signed) {
    const __m512i kp = _mm512_min_epu16(_mm512_subs_epu16(_mm512_and_si512(key, _mm512_set1_epi16(0x7FFF)),
                                                          _mm512_set1_epi16(ENC_K0)),
                                        _mm512_set1_epi16(ENC_KMAX));
    const __m512i binade = _mm512_srli_epi16(kp, 7);
    const __mmask32 upper = _mm512_cmpge_epu16_mask(kp, _mm512_permutexvar_epi16(binade, v->edge));
    const __m512i seg = _mm512_mask_add_epi16(binade, upper, binade, _mm512_set1_epi16(32));
    const __m512i a = _mm512_permutex2var_epi16(v->a0, seg, v->a1), b = _mm512_permutex2var_epi16(v->b0, seg, v->b1);
    const __m512i c = _mm512_srli_epi16(_mm512_add_epi16(_mm512_mulhi_epu16(_mm512_slli_epi16(kp, 9), a), b), 8);
    const __mmask32 negative = _mm512_movepi16_mask(key);
    if (is_signed) return _mm512_max_epi16(_mm512_mask_sub_epi16(c, negative, v->neg, c), _mm512_setzero_si512());
    return _mm512_maskz_mov_epi16(_knot_mask32(negative), c);  /* below every unsigned midpoint */
}

/* Codes of 64 values x * scale, exactly those of quant(). The midpoint above each bound is read from the byte
   planes, or (`gathers`; always without VBMI) by 16-value gathers from the fp32 midpoints. `is_signed` and
   `gathers` are constants where inlined. */
static inline void encode64(const float* x, __m512 scale, const Enc* v, const int is_signed, const int gathers,
                            uint8_t* out) {
    __m512 xs[4];
    for (int q = 0; q < 4; q++) xs[q] = _mm512_mul_ps(_mm512_load_ps(x + 16 * q), scale);
    const __m512i high = _mm512_loadu_si512(HIGH_WORDS);
    const __m512i c0 = code_bound32(_mm512_permutex2var_epi16(_mm512_castps_si512(xs[0]), high,
                                                              _mm512_castps_si512(xs[1])), v, is_signed);
    const __m512i c1 = code_bound32(_mm512_permutex2var_epi16(_mm512_castps_si512(xs[2]), high,
                                                              _mm512_castps_si512(xs[3])), v, is_signed);
#ifdef BYTE_PERMUTES
    if (!gathers) {
        const __m512i placed = _mm512_permutex2var_epi8(c0, _mm512_loadu_si512(PACK), c1);
        __m512i mid[4];
        lookup64(placed, v->mid, mid);
        __mmask16 above[4];
        for (int q = 0; q < 4; q++) above[q] = _mm512_cmp_ps_mask(_mm512_castsi512_ps(mid[q]), xs[q], _CMP_LT_OQ);
        const __mmask64 up = _mm512_kunpackd(_mm512_kunpackw(above[3], above[2]),
                                             _mm512_kunpackw(above[1], above[0]));
        const __m512i codes = _mm512_permutexvar_epi8(_mm512_loadu_si512(ORDER), placed);
        _mm512_storeu_si512(out, _mm512_mask_add_epi8(codes, up, codes, _mm512_set1_epi8(1)));
        return;
    }
#else
    (void)gathers;
#endif
    /* the bounds stay in 16-bit lanes: widened for the gathers, the comparisons added there */
    __m512i c[2] = {c0, c1};
    for (int h = 0; h < 2; h++) {
        const __m512i i0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(c[h]));
        const __m512i i1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c[h], 1));
        const __mmask16 a0 = _mm512_cmp_ps_mask(_mm512_i32gather_ps(i0, v->mids, 4), xs[2 * h], _CMP_LT_OQ);
        const __mmask16 a1 = _mm512_cmp_ps_mask(_mm512_i32gather_ps(i1, v->mids, 4), xs[2 * h + 1], _CMP_LT_OQ);
        c[h] = _mm512_mask_add_epi16(c[h], _mm512_kunpackw(a1, a0), c[h], _mm512_set1_epi16(1));
    }
#ifdef BYTE_PERMUTES
    _mm512_storeu_si512(out, _mm512_permutex2var_epi8(c[0], _mm512_loadu_si512(LOW_BYTES), c[1]));
#else
    _mm256_storeu_si256((__m256i*)out, _mm512_cvtepi16_epi8(c[0]));
    _mm256_storeu_si256((__m256i*)(out + 32), _mm512_cvtepi16_epi8(c[1]));
#endif
}

static inline uint32_t hmax16(__m512i x) { return (uint32_t)_mm512_reduce_max_epu32(x); }

/* a / d as quot8 does it, from the 14-bit estimate: Zen 4's divider is shared with the square root and the
   encoder's work, and one division per value took a fifth of the step */
static inline __m512 quot16(__m512 a, __m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    const __m512 q = _mm512_mul_ps(a, r);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, q, a), r, q);
}

/* Full blocks [b0, b1) of one flat run or rows, software-pipelined like the AVX2 path (block b-1 is encoded
   while block b is decoded and updated); partial blocks go to block_scalar. `m_gathers`, `v_gathers` (constants
   where inlined): that state's lookups by 16-value gathers rather than byte permutes. */
static inline __attribute__((always_inline)) void blocks_avx512_impl(
        float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma, uint8_t* restrict vq,
        float* restrict va, int64_t row, int64_t b0, int64_t b1, const float* restrict mmap,
        const int32_t* restrict mdirect, const uint8_t* restrict menc, const float* restrict vmap,
        const int32_t* restrict vdirect, const uint8_t* restrict venc, Hyper h, const int m_gathers,
        const int v_gathers) {
    Enc em, ev;
    enc_load(&em, menc);
    enc_load(&ev, venc);
    const int64_t per_row = (row + BLOCK - 1) / BLOCK;
    float buf[2][2][BLOCK] __attribute__((aligned(64)));  /* [block parity][m, v] */
    int64_t pend = -1;
    int pend_par = 0;
    float pend_im = 0.0f, pend_iv = 0.0f;
    /* Blocks ahead to prefetch (0: leave it to the hardware), measured both ways (50M values, 2 threads,
       interleaved with fused AdamW): on Zen 4 the hardware prefetcher alone was faster (27.0 -> 24.5 ms without
       the next block's prefetch); on an Intel Xeon (Granite Rapids class) prefetching two blocks ahead took the
       step from 1.28-1.34x fused AdamW to 1.05-1.14x (bench/optim_ab.py). A hint only: where rows end in
       partial blocks it lands a little off. */
    const int ahead = __builtin_cpu_is("amd") ? 0 : 2;
    const __m512 w1 = _mm512_set1_ps(h.w1), beta2 = _mm512_set1_ps(h.beta2), w2 = _mm512_set1_ps(h.w2);
    const __m512 decay = _mm512_set1_ps(h.decay), neg_step = _mm512_set1_ps(h.neg_step);
    const __m512 ibc2s = _mm512_set1_ps(h.ibc2s), eps = _mm512_set1_ps(h.eps);
    const __m512i nosign = _mm512_set1_epi32(0x7FFFFFFF);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t r = b / per_row, col = (b - r * per_row) * BLOCK, s = r * row + col;
        const int len = (row - col < BLOCK) ? (int)(row - col) : BLOCK;
        if (len < BLOCK) {
            block_scalar(p + s, g + s, mq + s, ma + b, vq + s, va + b, len, mmap, mdirect, vmap, vdirect, h);
            continue;
        }
        const int par = pend_par ^ 1;
        float* restrict m = buf[par][0];
        float* restrict v = buf[par][1];
        const __m512 am = _mm512_set1_ps(ma[b]), av = _mm512_set1_ps(va[b]);
        const __m512 pim = _mm512_set1_ps(pend_im), piv = _mm512_set1_ps(pend_iv);
        __m512i mmax = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
        if (ahead && b + ahead < b1) prefetch_block(p, g, mq, vq, s + ahead * BLOCK);
        for (int k = 0; k < BLOCK; k += 64) {
            __m512 m0[4], v0[4];
            decode64(mq + s + k, &em, mmap, am, m0, m_gathers);
            decode64(vq + s + k, &ev, vmap, av, v0, v_gathers);
            for (int q = 0; q < 4; q++) {
                const int i = k + 16 * q;
                const __m512 gi = _mm512_loadu_ps(g + s + i);
                const __m512 mi = _mm512_add_ps(m0[q], _mm512_mul_ps(w1, _mm512_sub_ps(gi, m0[q])));
                const __m512 vi = _mm512_add_ps(_mm512_mul_ps(v0[q], beta2), _mm512_mul_ps(_mm512_mul_ps(w2, gi), gi));
                /* p is no state: its update and the denominator take FMAs, two ops fewer per 16 values, 1-3% in
                   cache on an Intel Xeon where the step is bound by its vector ops; m and v keep the scalar build's
                   roundings, so their codes stay its (the AVX2 path fuses p's update alone: with the 12-bit
                   estimate's quotient the fused denominator took p past two ulp of the division) */
                const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vi), ibc2s, eps);
                const __m512 pk = _mm512_loadu_ps(p + s + i);
                _mm512_storeu_ps(p + s + i, _mm512_fmadd_ps(neg_step, quot16(mi, denom), _mm512_mul_ps(pk, decay)));
                _mm512_store_ps(m + i, mi);
                _mm512_store_ps(v + i, vi);
                mmax = _mm512_max_epu32(mmax, _mm512_and_si512(_mm512_castps_si512(mi), nosign));
                vmax = _mm512_max_epu32(vmax, _mm512_castps_si512(vi));
            }
            if (pend >= 0) {
                encode64(buf[pend_par][0] + k, pim, &em, 1, m_gathers, mq + pend + k);
                encode64(buf[pend_par][1] + k, piv, &ev, 0, v_gathers, vq + pend + k);
            }
        }
        const float fm = frombits(hmax16(mmax)), fv = frombits(hmax16(vmax));
        ma[b] = fm;
        va[b] = fv;
        pend = s;
        pend_par = par;
        pend_im = fm > 0.0f ? 1.0f / fm : 0.0f;
        pend_iv = fv > 0.0f ? 1.0f / fv : 0.0f;
    }
    if (pend >= 0) {
        const __m512 pim = _mm512_set1_ps(pend_im), piv = _mm512_set1_ps(pend_iv);
        for (int k = 0; k < BLOCK; k += 64) {
            encode64(buf[pend_par][0] + k, pim, &em, 1, m_gathers, mq + pend + k);
            encode64(buf[pend_par][1] + k, piv, &ev, 0, v_gathers, vq + pend + k);
        }
    }
}

/* With VBMI the loop is bound by the vector operations on the two ports that run 512-bit work, and the byte
   permutes of the lookups take most of one of them (the shuffle port), while the load ports idle. On an Intel
   Xeon (Granite Rapids class) m's lookups by gathers, which mostly load, took 4-9% off the step in cache (one
   thread, 1M values; 0.98 -> 0.90 of fused AdamW at 50M on 2 threads); all four lookups by gathers, or v's
   midpoints alone, were slower than m's alone. AMD's gathers are slow (~10 cycles per 8 values on Zen 4): there
   every lookup stays a byte permute. */
static void blocks_avx512(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                          uint8_t* restrict vq, float* restrict va, int64_t row, int64_t b0, int64_t b1,
                          const float* restrict mmap, const int32_t* restrict mdirect, const uint8_t* restrict menc,
                          const float* restrict vmap, const int32_t* restrict vdirect, const uint8_t* restrict venc,
                          Hyper h) {
#ifdef BYTE_PERMUTES
    if (m_gathers())
        blocks_avx512_impl(p, g, mq, ma, vq, va, row, b0, b1, mmap, mdirect, menc, vmap, vdirect, venc, h, 1, 0);
    else
        blocks_avx512_impl(p, g, mq, ma, vq, va, row, b0, b1, mmap, mdirect, menc, vmap, vdirect, venc, h, 0, 0);
#else
    blocks_avx512_impl(p, g, mq, ma, vq, va, row, b0, b1, mmap, mdirect, menc, vmap, vdirect, venc, h, 1, 1);
#endif
}

#ifdef BYTE_PERMUTES
int vector_path(void) { return 3; }
#else
int vector_path(void) { return 2; }
#endif

/* Codes of n values (any n) with the vector encoder: what the tests sweep against quant(). */
void encode_values(const float* restrict x, uint8_t* restrict out, int64_t n, const int32_t* restrict direct,
                   const uint8_t* restrict enc, int is_signed, int gathers) {
    Enc v;
    enc_load(&v, enc);
    float tmp[64] __attribute__((aligned(64)));
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        memcpy(tmp, x + i, sizeof tmp);
        encode64(tmp, _mm512_set1_ps(1.0f), &v, is_signed, gathers, out + i);
    }
    for (; i < n; i++) out[i] = quant(x[i], direct);
}
#else
#ifdef __AVX2__
int vector_path(void) { return 1; }
#else
int vector_path(void) { return 0; }
#endif

int set_m_gathers(int mode) {  /* the gather path has no byte permutes to choose between */
    (void)mode;
    return 0;
}

void encode_values(const float* restrict x, uint8_t* restrict out, int64_t n, const int32_t* restrict direct,
                   const uint8_t* restrict enc, int is_signed, int gathers) {
    (void)enc;
    (void)is_signed;
    (void)gathers;
    for (int64_t i = 0; i < n; i++) out[i] = quant(x[i], direct);
}
#endif

#ifndef AVX512_PATH
/* Blocks [b0, b1) of a tensor of rows of `row` values (a flat tensor is one row); a block never crosses a row.
   Vector path: software-pipelined over full blocks. While block b is decoded and updated (the update is
   bound by the divider: a division and a square root per value), block b-1, whose absmax is now known, is
   requantised from a second buffer, so the gathers and integer work of one overlap the divider of the other. */
static void blocks_gather(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                          uint8_t* restrict vq, float* restrict va, int64_t row, int64_t b0, int64_t b1,
                          const float* restrict mmap, const int32_t* restrict mdirect,
                          const float* restrict vmap, const int32_t* restrict vdirect, Hyper h) {
    const int64_t per_row = (row + BLOCK - 1) / BLOCK;
#ifdef __AVX2__
    float buf[2][2][BLOCK] __attribute__((aligned(32)));  /* [block parity][m, v] */
    int64_t pend = -1;  /* start of the block waiting to be requantised, -1: none */
    int pend_par = 0;
    float pend_im = 0.0f, pend_iv = 0.0f;
    const __m256 w1 = _mm256_set1_ps(h.w1), beta2 = _mm256_set1_ps(h.beta2), w2 = _mm256_set1_ps(h.w2);
    const __m256 decay = _mm256_set1_ps(h.decay), neg_step = _mm256_set1_ps(h.neg_step);
    const __m256 ibc2s = _mm256_set1_ps(h.ibc2s), eps = _mm256_set1_ps(h.eps);
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
            if (b + 1 < b1) prefetch_block(p, g, mq, vq, s + BLOCK);
            for (int k = 0; k < BLOCK; k += 8) {
                const __m256 gi = _mm256_loadu_ps(g + s + k);
                const __m256 m0 = decode8(mq + s + k, mmap, am), v0 = decode8(vq + s + k, vmap, av);
                const __m256 mi = _mm256_add_ps(m0, _mm256_mul_ps(w1, _mm256_sub_ps(gi, m0)));
                const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(_mm256_mul_ps(w2, gi), gi));
                const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), ibc2s), eps);
                const __m256 pk = _mm256_loadu_ps(p + s + k);
                _mm256_storeu_ps(p + s + k, madd8(neg_step, quot8(mi, denom), _mm256_mul_ps(pk, decay)));
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
#endif

void adamw8bit_blocks(float* restrict p, const float* restrict g, uint8_t* restrict mq, float* restrict ma,
                      uint8_t* restrict vq, float* restrict va, int64_t row, int64_t b0, int64_t b1,
                      const float* restrict mmap, const int32_t* restrict mdirect, const uint8_t* restrict menc,
                      const float* restrict vmap, const int32_t* restrict vdirect, const uint8_t* restrict venc,
                      const float* restrict hp) {
    const Hyper h = {hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]};
#ifdef AVX512_PATH
    blocks_avx512(p, g, mq, ma, vq, va, row, b0, b1, mmap, mdirect, menc, vmap, vdirect, venc, h);
#else
    (void)menc;
    (void)venc;
    blocks_gather(p, g, mq, ma, vq, va, row, b0, b1, mmap, mdirect, vmap, vdirect, h);
#endif
}

/* One tensor's update: what adamw8bit_blocks takes, with its own step constants. */
typedef struct {
    float* p;
    const float* g;
    uint8_t* mq;
    float* ma;
    uint8_t* vq;
    float* va;
    int64_t row, nb;
    const float* hp;
} Job;

/* Blocks [lo, hi) of all jobs' blocks laid end to end: the jobs they fall in, each over its part of the range. */
void adamw8bit_range(const Job* jobs, int64_t njobs, int64_t lo, int64_t hi, const float* restrict mmap,
                     const int32_t* restrict mdirect, const uint8_t* restrict menc, const float* restrict vmap,
                     const int32_t* restrict vdirect, const uint8_t* restrict venc) {
    int64_t base = 0;
    for (int64_t j = 0; j < njobs && base < hi; base += jobs[j].nb, j++) {
        const Job* t = jobs + j;
        const int64_t b0 = lo > base ? lo - base : 0, b1 = hi - base < t->nb ? hi - base : t->nb;
        if (b0 < b1)
            adamw8bit_blocks(t->p, t->g, t->mq, t->ma, t->vq, t->va, t->row, b0, b1, mmap, mdirect, menc, vmap,
                             vdirect, venc, t->hp);
    }
}

int openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* All jobs (every tensor of a step: `total` blocks) in one parallel region of the OpenMP runtime torch runs its own
   ops on: libgomp is loaded once per process (by its soname), so this binds to torch's, and its workers, still
   spinning after torch's last parallel region (the backward pass), run this step instead of taking the cores from
   other threads (that cost ~20% of the step). Each thread takes an equal contiguous run of the blocks, across
   tensor boundaries: one region per step, not one per tensor, and small tensors share the threads too. A block's
   result does not depend on the thread that runs it, so any split gives bitwise the same states. */
void adamw8bit_jobs(const Job* jobs, int64_t njobs, int64_t total, int threads, const float* restrict mmap,
                    const int32_t* restrict mdirect, const uint8_t* restrict menc, const float* restrict vmap,
                    const int32_t* restrict vdirect, const uint8_t* restrict venc) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        adamw8bit_range(jobs, njobs, total * t / nt, total * (t + 1) / nt, mmap, mdirect, menc, vmap, vdirect,
                        venc);
    }
#else
    (void)threads;
    adamw8bit_range(jobs, njobs, 0, total, mmap, mdirect, menc, vmap, vdirect, venc);
#endif
}
"""



def _byte_orders() -> dict[str, str]:
    """ORDER, PACK, HIGH_WORDS and LOW_BYTES of the AVX-512 path as C initialisers (see the comments there)."""
    order = [16 * ((i >> 2) & 3) + 4 * (i >> 4) + (i & 3) for i in range(64)]
    pack = [2 * o for o in order]  # value v's code is the low byte of word v of the two 16-bit vectors
    high = [2 * i + 1 for i in range(32)]
    low = [2 * i for i in range(64)]
    return {name: ", ".join(map(str, values)) for name, values in
            (("ORDER_INIT", order), ("PACK_INIT", pack), ("HIGH_INIT", high), ("LOW_INIT", low))}


SOURCE = TEMPLATE
for _name, _init in _byte_orders().items():
    SOURCE = SOURCE.replace(_name, _init)
FLAGS = [f"-D{k}={v}" for k, v in dict(BLOCK=BLOCK, E_LO=E_LO, EXPONENTS=EXPONENTS, **ENC_LAYOUT).items()]
MIN_PARALLEL_BLOCKS = 256  # below ~64K values one thread is faster than a hand-off


# Builds of the kernel: "native" takes the best vector path -march=native offers; "avx512" leaves VBMI out (the
# AVX-512 path with gathers, as on Skylake and Cascade Lake Xeons); "avx2" leaves AVX-512 out (the gather path on
# any AVX2 CPU); "scalar" leaves AVX2 out too (the value-by-value reference).
ISA_FLAGS = {"native": [], "avx512": ["-mno-avx512vbmi"], "avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2"]}


def load(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when no C compiler works here. `isa`: one of ISA_FLAGS,
    default $MEMFIT_KERNEL_ISA or "native" (set it to compare a vector path with the scalar reference)."""
    isa = isa or os.environ.get("MEMFIT_KERNEL_ISA", "native")
    if isa not in ISA_FLAGS:
        raise ConfigError(f"MEMFIT_KERNEL_ISA={isa!r} is not a kernel build; use one of {', '.join(ISA_FLAGS)}.")
    return _load(isa)


@cache
def _load(isa: str) -> ctypes.CDLL | None:
    flags = FLAGS + ISA_FLAGS[isa]
    # OpenMP where the compiler has it (see adamw8bit_jobs); else the same C with Python's threads
    lib = compile_library("adamw8bit", SOURCE, [*flags, "-fopenmp"], "the 8-bit AdamW step", warn=False)
    lib = lib or compile_library("adamw8bit", SOURCE, flags, "the 8-bit AdamW step")
    if lib is None:
        return None
    fn = lib.adamw8bit_blocks
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 7
    span = lib.adamw8bit_range
    span.restype = None
    span.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 6
    jobs = lib.adamw8bit_jobs
    jobs.restype = None
    jobs.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 6
    lib.openmp.restype = ctypes.c_int
    enc = lib.encode_values
    enc.restype = None
    enc.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
    lib.vector_path.restype = ctypes.c_int
    lib.set_m_gathers.restype = ctypes.c_int
    lib.set_m_gathers.argtypes = [ctypes.c_int]
    return lib


def vector_path(isa: str | None = None) -> str | None:
    """Which path the build runs: "avx512-vbmi", "avx512" (no VBMI: gathers), "avx2" or "scalar" (None: no
    compiler)."""
    lib = load(isa)
    return None if lib is None else ("scalar", "avx2", "avx512", "avx512-vbmi")[lib.vector_path()]


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="memfit-adamw8bit")


class Job(ctypes.Structure):
    """The C struct of one tensor's update (its pointers, row length, block count and step constants)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("p", "g", "mq", "ma", "vq", "va")] + [
        ("row", ctypes.c_int64), ("nb", ctypes.c_int64), ("hp", ctypes.c_void_p)]


# One tensor's update: p, g, mq, ma, vq, va, hp (tensors, see adamw8bit_steps) and the row length.
Update = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def _job(update: Update) -> Job:
    """The C job of one update, after checking every size: the C code trusts them (a state loaded from a
    checkpoint may not fit its parameter)."""
    p, g, mq, ma, vq, va, hp, row = update
    n = p.numel()
    nb = (n // row) * -(-row // BLOCK) if row else 0
    f32, u8 = torch.float32, torch.uint8
    sizes = (("p", p, f32, n), ("g", g, f32, n), ("exp_avg_q", mq, u8, n), ("exp_avg_sq_q", vq, u8, n),
             ("exp_avg_absmax", ma, f32, nb), ("exp_avg_sq_absmax", va, f32, nb), ("hp", hp, f32, 7))
    for name, t, dtype, size in sizes:  # every step, for every tensor: kept cheap (~5 µs for the seven)
        if t.dtype is not dtype or t.numel() != size or not t.is_cpu or not t.is_contiguous():
            raise CheckpointError(f"8-bit AdamW kernel: {name} must be a contiguous CPU {dtype} tensor of {size} "
                                  f"values, got {t.dtype} {list(t.shape)} on {t.device}; the optimizer state does not "
                                  "fit its parameter (resume with the run's own checkpoint).")
    if row <= 0 or n % row:
        raise CheckpointError(f"8-bit AdamW kernel: {n} values do not split into rows of {row}.")
    return Job(*(t.data_ptr() for t in (p, g, mq, ma, vq, va)), row, nb, hp.data_ptr())


def adamw8bit_steps(updates: list[Update], tm: QuantTables, tv: QuantTables) -> None:
    """Update many tensors in place with one call: flat contiguous CPU tensors p, g fp32 [n]; mq, vq uint8 [n];
    ma, va fp32 [nb]; hp fp32 [7]; blocks along rows of `row` values (`row` = n for one flat run of blocks). All
    their blocks are split evenly over the threads, across tensor boundaries: one parallel region per step instead
    of one per tensor (each cost ~60 µs, ~6 ms a step for a 100-tensor model), and small tensors are shared too."""
    if not updates:
        return
    jobs = (Job * len(updates))(*map(_job, updates))  # the tensors stay referenced by `updates` meanwhile
    total = sum(job.nb for job in jobs)
    lib = load()
    tables = [t.data_ptr() for t in (tm.qmap, tm.direct, tm.encoder, tv.qmap, tv.direct, tv.encoder)]
    threads = min(torch.get_num_threads(), max(1, total // MIN_PARALLEL_BLOCKS))
    if lib.openmp():
        lib.adamw8bit_jobs(jobs, len(jobs), total, threads, *tables)
        return
    if threads == 1:
        lib.adamw8bit_range(jobs, len(jobs), 0, total, *tables)
        return
    bounds = [total * i // threads for i in range(threads + 1)]
    pool = _pool(threads)
    futures = [pool.submit(lib.adamw8bit_range, jobs, len(jobs), lo, hi, *tables)
               for lo, hi in zip(bounds, bounds[1:], strict=False)]
    for f in futures:
        f.result()
