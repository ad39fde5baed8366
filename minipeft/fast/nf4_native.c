/* 4-bit dequantization in one native pass: minipeft/core/nf4.py's dequantize_4bit, the same bits.
 *
 *     w_hat_i = code[q_i] * absmax[i / blocksize]      one fp32 multiply, then rounded once to the output
 *
 * q_i is the high nibble of packed byte i/2 for even i, the low nibble for odd i; an odd n drops the
 * last byte's low nibble. Built by nf4_native.py with `cc -O3 -shared -fPIC -ffp-contract=off -fopenmp`:
 * -ffp-contract=off forbids fusing a multiply and an add into one FMA. The double-quantized absmax is
 * dynamic[c] * scale + offset, which torch rounds twice (after the multiply, after the add); an FMA
 * rounds once, and gcc does fuse it (its default is -ffp-contract=fast) inside the AVX-512 loop, whose
 * target includes FMA: other bits on some blocks. The flag keeps every multiply and add rounded apart.
 *
 * Rounding fp32 to a 16-bit float, round-to-nearest-even (RNE), as torch's .to() does on CPU:
 *   bf16  the top 16 bits of the fp32 pattern. Adding 0x7FFF + (bit 16) before cutting rounds to nearest,
 *         and a tie (low half exactly 0x8000) up only when the kept part is odd (bit 16 set): to even. A
 *         carry runs into the exponent, so the largest values round to inf as they should. NaN becomes
 *         0xFFFF, as torch's vectorized conversion writes it.
 *   fp16  the compiler's _Float16 cast (gcc >= 12 on x86-64: RNE, subnormals, overflow to inf), or the
 *         hardware's vcvtps2ph in the vector loops; both are what torch uses.
 *
 * Three loops over whole blocks, the CPU chosen at run time (the library itself is built for baseline
 * x86-64, so it runs on every generation): AVX-512 and AVX2 decode 32 / 16 values per step, looking up
 * the 16 codes in registers (vpermps); plain C does the rest (other CPUs, the tail of a partial block).
 * Blocks are split over `threads` OpenMP threads (torch's own libgomp, loaded first, serves them).
 */
#include <stdint.h>
#include <string.h>

enum { OUT_FP32 = 0, OUT_BF16 = 1, OUT_FP16 = 2 };
/* Waking a second thread costs a few µs: below this many values it does not pay (measured on 2 cores). */
enum { PARALLEL_FROM = 1 << 15 };

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

/* One call's work: n values from packed codes into out (out_kind), blocks of blocksize. */
typedef struct {
    const uint8_t *packed;
    int64_t n, blocksize;
    const float *code;
    Absmax absmax;
    void *out;
    int kind;
} Job;

/* Block b's values [*start, *stop) and its absmax. */
static inline float block_bounds(const Job *job, int64_t b, int64_t *start, int64_t *stop) {
    *start = b * job->blocksize;
    *stop = *start + job->blocksize < job->n ? *start + job->blocksize : job->n;
    return block_absmax(&job->absmax, b);
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

/* Blocks [b0, b1): plain C. The vector versions below are the same loop, each compiled for its CPU (a
 * function per target, so that the block's code inlines and the constants stay in registers). */
static void blocks_plain(const Job *job, int64_t b0, int64_t b1) {
    for (int64_t b = b0, start, stop; b < b1; b++) {
        float a = block_bounds(job, b, &start, &stop);
        block_plain(job->packed, start, stop, job->code, a, job->out, job->kind);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* bf16_rne in each 32-bit lane (the result in the low 16 bits), AVX-512 and AVX2. */
__attribute__((target("avx512f")))
static inline __m512i bf16_avx512(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}

__attribute__((target("avx2")))
static inline __m256i bf16_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* Both vector loops look up h_k = code[byte_k >> 4] and l_k = code[byte_k & 15] for a run of bytes, times
 * the block's absmax: the values of elements i + 2k and i + 2k + 1. bf16 needs no reordering: the 32-bit
 * word k of the output is the pair (h_k, l_k), low half first (x86 is little-endian). fp32 and fp16
 * interleave h and l into h0 l0 h1 l1 … first. */

/* AVX-512: 16 bytes -> 32 values per step. Returns how many values it did (a multiple of 32). */
__attribute__((target("avx512f"), always_inline))
static inline int64_t block_avx512(const uint8_t *packed, int64_t start, int64_t stop, const float *code,
                                   float a, void *out, int kind) {
    const __m512 table = _mm512_loadu_ps(code), scale = _mm512_set1_ps(a);
    /* the interleave: index k < 16 picks h_k, 16 + k picks l_k */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    int64_t i = start;
    for (; i + 32 <= stop; i += 32) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
        __m512 h = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
        __m512 l = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, table), scale);  /* low 4 bits of the index */
        if (kind == OUT_BF16) {
            __m512i pairs = _mm512_or_si512(bf16_avx512(h), _mm512_slli_epi32(bf16_avx512(l), 16));
            _mm512_storeu_si512((uint16_t *)out + i, pairs);
            continue;
        }
        __m512 v0 = _mm512_permutex2var_ps(h, first, l), v1 = _mm512_permutex2var_ps(h, second, l);
        if (kind == OUT_FP32) {
            _mm512_storeu_ps((float *)out + i, v0);
            _mm512_storeu_ps((float *)out + i + 16, v1);
        } else {
            const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtps_ph(v0, rne));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i + 16), _mm512_cvtps_ph(v1, rne));
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
__attribute__((target("avx2,f16c"), always_inline))
static inline int64_t block_avx2(const uint8_t *packed, int64_t start, int64_t stop, const float *code,
                                 float a, void *out, int kind) {
    const __m256 low8 = _mm256_loadu_ps(code), high8 = _mm256_loadu_ps(code + 8), scale = _mm256_set1_ps(a);
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + i / 2)));
        __m256 h = _mm256_mul_ps(lookup16(low8, high8, _mm256_srli_epi32(bytes, 4)), scale);
        __m256 l = _mm256_mul_ps(lookup16(low8, high8, _mm256_and_si256(bytes, _mm256_set1_epi32(15))), scale);
        if (kind == OUT_BF16) {
            __m256i pairs = _mm256_or_si256(bf16_avx2(h), _mm256_slli_epi32(bf16_avx2(l), 16));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), pairs);
            continue;
        }
        /* unpack interleaves within 128-bit lanes: (h0 l0 h1 l1 | h4 l4 h5 l5), (h2 l2 h3 l3 | h6 l6 h7 l7) */
        __m256 a0 = _mm256_unpacklo_ps(h, l), a1 = _mm256_unpackhi_ps(h, l);
        __m256 v0 = _mm256_permute2f128_ps(a0, a1, 0x20), v1 = _mm256_permute2f128_ps(a0, a1, 0x31);
        if (kind == OUT_FP32) {
            _mm256_storeu_ps((float *)out + i, v0);
            _mm256_storeu_ps((float *)out + i + 8, v1);
        } else {
            const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v0, rne));
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i + 8), _mm256_cvtps_ph(v1, rne));
        }
    }
    return i - start;
}

__attribute__((target("avx512f")))
static void blocks_avx512(const Job *job, int64_t b0, int64_t b1) {
    for (int64_t b = b0, start, stop; b < b1; b++) {
        float a = block_bounds(job, b, &start, &stop);
        start += block_avx512(job->packed, start, stop, job->code, a, job->out, job->kind);
        block_plain(job->packed, start, stop, job->code, a, job->out, job->kind);  /* a partial block's tail */
    }
}

__attribute__((target("avx2,f16c")))
static void blocks_avx2(const Job *job, int64_t b0, int64_t b1) {
    for (int64_t b = b0, start, stop; b < b1; b++) {
        float a = block_bounds(job, b, &start, &stop);
        start += block_avx2(job->packed, start, stop, job->code, a, job->out, job->kind);
        block_plain(job->packed, start, stop, job->code, a, job->out, job->kind);
    }
}
#endif

/* Which loop this CPU runs: 2 AVX-512, 1 AVX2, 0 plain C (nf4_native.py passes it back as `loop`). */
int dequantize_nf4_loop(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

/* packed (ceil(n/2),) bytes, code (16,) fp32, the absmax as above -> out (n,) of out_kind. blocksize must
 * be even (core's are powers of two from 32); loop as dequantize_nf4_loop returns, or a lower one
 * (tests run every loop the CPU has). The blocks are cut into `threads` equal runs, one per thread;
 * below PARALLEL_FROM values one thread does it all. */
void dequantize_nf4(const uint8_t *packed, int64_t n, const float *code, int64_t blocksize, Absmax absmax,
                    void *out, int out_kind, int threads, int loop) {
    Job job = {packed, n, blocksize, code, absmax, out, out_kind};
    int64_t n_blocks = (n + blocksize - 1) / blocksize;
    if (threads < 1 || n < PARALLEL_FROM) threads = 1;
#pragma omp parallel for schedule(static, 1) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; t++) {
        int64_t b0 = n_blocks * t / threads, b1 = n_blocks * (t + 1) / threads;
#if defined(__x86_64__) && defined(__GNUC__)
        if (loop == 2) { blocks_avx512(&job, b0, b1); continue; }
        if (loop == 1) { blocks_avx2(&job, b0, b1); continue; }
#endif
        blocks_plain(&job, b0, b1);
    }
}
