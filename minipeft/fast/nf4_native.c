/* 4-bit dequantization in one native pass: minipeft/core/nf4.py's dequantize_4bit, the same bits.
 *
 *     w_hat_i = code[q_i] * absmax[i / blocksize]      one fp32 multiply, then rounded once to the output
 *
 * q_i is the high nibble of packed byte i/2 for even i, the low nibble for odd i; an odd n drops the
 * last byte's low nibble. Built by nf4_native.py with `cc -O3 -shared -fPIC -ffp-contract=off -fopenmp`:
 * -ffp-contract=off forbids fusing a multiply and an add into one FMA (rounded once instead of twice, so
 * other bits). The kernel has no add today; the flag keeps it that way if someone adds one.
 *
 * Rounding fp32 to a 16-bit float, round-to-nearest-even (RNE), as torch's .to() does on CPU:
 *   bf16  the top 16 bits of the fp32 pattern. Adding 0x7FFF + (bit 16) before cutting rounds to nearest,
 *         and a tie (low half exactly 0x8000) up only when the kept part is odd (bit 16 set): to even. A
 *         carry runs into the exponent, so the largest values round to inf as they should. NaN becomes
 *         0xFFFF, as torch's vectorized conversion writes it.
 *   fp16  the compiler's _Float16 cast (gcc >= 12 on x86-64: RNE, subnormals, overflow to inf), or the
 *         hardware's vcvtps2ph in the vector paths; both are what torch uses.
 *
 * Three paths over whole blocks, the CPU chosen at run time (the library itself is built for baseline
 * x86-64, so it runs on every generation): AVX-512 and AVX2 decode 32 / 16 values per step, looking up
 * the 16 codes in registers (vpermps); plain C does the rest (other CPUs, the tail of a partial block).
 * Blocks are split over `threads` OpenMP threads (torch's own libgomp, loaded first, serves them).
 */
#include <stdint.h>
#include <string.h>

enum { OUT_FP32 = 0, OUT_BF16 = 1, OUT_FP16 = 2 };

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xFFFF;  /* NaN */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline void store(void *out, int64_t i, float v, int kind) {
    if (kind == OUT_FP32) {
        ((float *)out)[i] = v;
    } else if (kind == OUT_BF16) {
        ((uint16_t *)out)[i] = bf16_rne(v);
    } else {
        _Float16 h = (_Float16)v;
        memcpy((uint16_t *)out + i, &h, 2);
    }
}

/* Values [start, stop) of one block (start even), all scaled by a: plain C. */
static void block_plain(const uint8_t *packed, int64_t start, int64_t stop, const float *code, float a,
                        void *out, int kind) {
    for (int64_t i = start; i < stop; i += 2) {
        uint8_t byte = packed[i / 2];
        store(out, i, code[byte >> 4] * a, kind);  /* high nibble: the even element */
        if (i + 1 < stop) store(out, i + 1, code[byte & 15] * a, kind);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* AVX-512: 16 bytes -> 32 values per step. Returns how many values it did (a multiple of 32). */
__attribute__((target("avx512f")))
static int64_t block_avx512(const uint8_t *packed, int64_t start, int64_t stop, const float *code,
                            float a, void *out, int kind) {
    const __m512 table = _mm512_loadu_ps(code), scale = _mm512_set1_ps(a);
    /* interleave the high-nibble values h and the low-nibble values l: h0 l0 h1 l1 … (index 16+k is l_k) */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    int64_t i = start;
    for (; i + 32 <= stop; i += 32) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
        __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);  /* code[byte >> 4] */
        __m512 l = _mm512_permutexvar_ps(bytes, table);  /* uses the low 4 bits of each index only */
        __m512 v[2] = {_mm512_mul_ps(_mm512_permutex2var_ps(h, first, l), scale),
                       _mm512_mul_ps(_mm512_permutex2var_ps(h, second, l), scale)};
        for (int k = 0; k < 2; k++) {
            if (kind == OUT_FP32) {
                _mm512_storeu_ps((float *)out + i + 16 * k, v[k]);
                continue;
            }
            __m256i half;
            if (kind == OUT_BF16) {  /* bf16_rne on 16 lanes */
                __m512i u = _mm512_castps_si512(v[k]);
                __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
                __mmask16 nan = _mm512_cmp_ps_mask(v[k], v[k], _CMP_UNORD_Q);
                half = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xFFFF)));
            } else {
                half = _mm512_cvtps_ph(v[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i + 16 * k), half);
        }
    }
    return i - start;
}

/* 16 code values looked up by the low 4 bits of idx, with 8-entry permutes: bit 3 picks the half. */
__attribute__((target("avx2")))
static inline __m256 lookup16(__m256 low8, __m256 high8, __m256i idx) {
    __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  /* bit 3 moved to the sign bit */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx), _mm256_permutevar8x32_ps(high8, idx), bit3);
}

/* AVX2 (+F16C): 8 bytes -> 16 values per step. */
__attribute__((target("avx2,f16c")))
static int64_t block_avx2(const uint8_t *packed, int64_t start, int64_t stop, const float *code,
                          float a, void *out, int kind) {
    const __m256 low8 = _mm256_loadu_ps(code), high8 = _mm256_loadu_ps(code + 8), scale = _mm256_set1_ps(a);
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + i / 2)));
        __m256 h = lookup16(low8, high8, _mm256_srli_epi32(bytes, 4));
        __m256 l = lookup16(low8, high8, _mm256_and_si256(bytes, _mm256_set1_epi32(15)));
        /* unpack interleaves within 128-bit lanes: (h0 l0 h1 l1 | h4 l4 h5 l5), (h2 l2 h3 l3 | h6 l6 h7 l7) */
        __m256 a0 = _mm256_unpacklo_ps(h, l), a1 = _mm256_unpackhi_ps(h, l);
        __m256 v[2] = {_mm256_mul_ps(_mm256_permute2f128_ps(a0, a1, 0x20), scale),
                       _mm256_mul_ps(_mm256_permute2f128_ps(a0, a1, 0x31), scale)};
        for (int k = 0; k < 2; k++) {
            if (kind == OUT_FP32) {
                _mm256_storeu_ps((float *)out + i + 8 * k, v[k]);
                continue;
            }
            __m128i half;
            if (kind == OUT_BF16) {
                __m256i u = _mm256_castps_si256(v[k]);
                __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
                __m256 nan = _mm256_cmp_ps(v[k], v[k], _CMP_UNORD_Q);
                r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(nan));
                /* 8 × 32 bits -> 8 × 16 bits (values fit: packus does not saturate them) */
                half = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            } else {
                half = _mm256_cvtps_ph(v[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i + 8 * k), half);
        }
    }
    return i - start;
}
#endif

/* Which path this CPU takes: 2 AVX-512, 1 AVX2, 0 plain C (what `nf4_native.py` reports). */
int dequantize_nf4_path(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

/* The absmax of every block: given (absmax != NULL), or double-quantized — dyn_map[dyn_code[b]] times the
 * scale of b's group of dyn_blocksize blocks, plus offset: a multiply rounded, then an add rounded, as
 * torch computes it in core (an FMA would round once: -ffp-contract=off keeps the two roundings). */
typedef struct {
    const float *absmax;
    const uint8_t *dyn_code;
    const float *dyn_map, *dyn_scale;
    float offset;
    int64_t dyn_blocksize;
} Absmax;

static inline float block_absmax(const Absmax *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    float scaled = s->dyn_map[s->dyn_code[b]] * s->dyn_scale[b / s->dyn_blocksize];
    return scaled + s->offset;
}

/* packed (ceil(n/2),) bytes, code (16,) fp32, the absmax as above -> out (n,) of out_kind. blocksize must
 * be even (core's are powers of two from 32); path as dequantize_nf4_path returns, or a lower one. */
void dequantize_nf4(const uint8_t *packed, int64_t n, const float *code, int64_t blocksize, Absmax absmax,
                    void *out, int out_kind, int threads, int path) {
    int64_t n_blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t start = b * blocksize, stop = start + blocksize < n ? start + blocksize : n;
        float a = block_absmax(&absmax, b);
#if defined(__x86_64__) && defined(__GNUC__)
        if (path == 2) start += block_avx512(packed, start, stop, code, a, out, out_kind);
        else if (path == 1) start += block_avx2(packed, start, stop, code, a, out, out_kind);
#endif
        block_plain(packed, start, stop, code, a, out, out_kind);
    }
}
