/* The C loops behind TIES, linear and SLERP on the CPU. Each one does what a sequence of numpy or torch steps
 * in mbuild/methods/ does, in one pass and with the same bytes; those steps remain, and run
 * wherever this optional extension was not built. Called through ctypes (which releases the
 * GIL); the module itself defines nothing, it only makes the shared object importable.
 *
 * mbuild_follow_i32 / _i64 (the index type): where libstdc++'s std::sort (comp = greater)
 * cuts an array of floats at position `count`, following only the partitions that hold the
 * cut (ranking.py explains why, and holds the numpy walk this one must agree with). It fills
 * `index` with 0..size-1 and permutes `keys` and `index` together exactly as std::sort's
 * partitions would along the followed path, then stable-sorts the leaf holding the cut. On
 * return 0, `keys[:count]` (and `index[:count]`) hold the elements the sort puts first, and
 * `*threshold` is the smallest of them. Return 1: introsort would switch to heapsort (the
 * depth limit ran out); 2: bookkeeping gave no cut. Keys must be finite.
 *
 * mbuild_task_vector, mbuild_keep_above, mbuild_ties_combine: task_arithmetic.py's task
 * vector, magnitude thinning and sum-consensus combine (comments at each).
 *
 * mbuild_magnitudes16, mbuild_keep_above16, mbuild_ties_combine16: the same steps of TIES in a
 * 16-bit compute dtype (bfloat16 or float16), each op rounded as torch rounds it.
 *
 * mbuild_linear: linear.py's weighted sum over a whole tensor in one pass, stored inputs in,
 * output dtype out, on `threads` threads; mbuild_slerp_combine: slerp.py's last pass, the
 * same way; mbuild_scaled_product: the element-wise half of slerp.py's dot (comments at each).
 *
 * Build flags (setup.py): no FMA contraction, so products and sums round separately as
 * torch's element-wise ops do; no trapping math, so comparisons vectorize.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifndef _WIN32
#include <pthread.h>
#define HAVE_THREADS 1
#endif
/* linear's loop needs the CPU's fused multiply-add; it is compiled for it (and the CPU asked)
 * on x86 with GCC or Clang only. Elsewhere mbuild_has_fma says 0 and torch's steps run. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FMA_TARGET __attribute__((target("avx2,fma")))
#define HAVE_FMA_CHECK 1
#else
#define FMA_TARGET
#endif

/* libstdc++'s _S_threshold: ranges this small are left to the final insertion sort. */
#define INSERTION_THRESHOLD 16
/* Stops are gathered this many elements at a time on each side, without branches. */
#define BLOCK 128

/* Swap two keys and their positions. */
#define SWAP(INDEX, K, X, A, B)                                                                \
    do {                                                                                       \
        float swap_key = (K)[A];                                                               \
        (K)[A] = (K)[B];                                                                       \
        (K)[B] = swap_key;                                                                     \
        INDEX swap_position = (X)[A];                                                          \
        (X)[A] = (X)[B];                                                                       \
        (X)[B] = swap_position;                                                                \
    } while (0)

/* std::__unguarded_partition(first + 1, last, first, greater) on k[0..m), pivot at k[0],
 * returning the cut. The blocks pair the i-th left stop with the i-th right stop, as the
 * scanners do, while a gap of two blocks separates them; the scanners' own loop finishes,
 * resumed at the first unpaired stop, since near the crossing they read swapped elements. */
#define DEFINE_FOLLOW(NAME, INDEX)                                                              \
    static int64_t NAME##_partition(float *k, INDEX *x, int64_t m)                             \
    {                                                                                          \
        const float pivot = k[0];                                                              \
        unsigned char off_l[BLOCK], off_r[BLOCK];                                              \
        int64_t l = 1, r = m - 1, base_l = 0, base_r = 0;                                      \
        int nl = 0, nr = 0, sl = 0, sr = 0;                                                    \
        while (r - l + 1 >= 2 * BLOCK) {                                                       \
            if (nl == 0) {                                                                     \
                sl = 0;                                                                        \
                base_l = l;                                                                    \
                for (int i = 0; i < BLOCK; i++) {                                              \
                    off_l[nl] = (unsigned char)i;                                              \
                    nl += !(k[l + i] > pivot);                                                 \
                }                                                                              \
                l += BLOCK;                                                                    \
            }                                                                                  \
            if (nr == 0) {                                                                     \
                sr = 0;                                                                        \
                base_r = r;                                                                    \
                for (int i = 0; i < BLOCK; i++) {                                              \
                    off_r[nr] = (unsigned char)i;                                              \
                    nr += !(pivot > k[r - i]);                                                 \
                }                                                                              \
                r -= BLOCK;                                                                    \
            }                                                                                  \
            int n = nl < nr ? nl : nr;                                                         \
            for (int j = 0; j < n; j++) {                                                      \
                SWAP(INDEX, k, x, base_l + off_l[sl + j], base_r - off_r[sr + j]);             \
            }                                                                                  \
            nl -= n;                                                                           \
            nr -= n;                                                                           \
            sl += n;                                                                           \
            sr += n;                                                                           \
        }                                                                                      \
        int64_t first = nl > 0 ? base_l + off_l[sl] : l;                                       \
        int64_t last = nr > 0 ? base_r - off_r[sr] + 1 : r + 1;                                \
        for (;;) {                                                                             \
            while (k[first] > pivot)                                                           \
                first++;                                                                       \
            last--;                                                                            \
            while (pivot > k[last])                                                            \
                last--;                                                                        \
            if (!(first < last))                                                               \
                return first;                                                                  \
            SWAP(INDEX, k, x, first, last);                                                    \
            first++;                                                                           \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    int NAME(float *keys, INDEX *index, int64_t size, int64_t count, int64_t depth_limit,      \
             float *threshold)                                                                 \
    {                                                                                          \
        for (int64_t i = 0; i < size; i++)                                                     \
            index[i] = (INDEX)i;                                                               \
        int64_t low = 0, high = size;                                                          \
        int have_pivot = 0;                                                                    \
        float last_pivot = 0;                                                                  \
        while (low < count && count < high && high - low > INSERTION_THRESHOLD) {              \
            if (depth_limit == 0)                                                              \
                return 1;                                                                      \
            depth_limit--;                                                                     \
            float *k = keys + low;                                                             \
            INDEX *x = index + low;                                                            \
            int64_t m = high - low;                                                            \
            /* std::__move_median_to_first(first, first + 1, mid, last - 1, greater) */       \
            int64_t a = 1, b = m / 2, c = m - 1, chosen;                                       \
            if (k[a] > k[b])                                                                   \
                chosen = (k[b] > k[c]) ? b : ((k[a] > k[c]) ? c : a);                          \
            else if (k[a] > k[c])                                                              \
                chosen = a;                                                                    \
            else                                                                               \
                chosen = (k[b] > k[c]) ? c : b;                                                \
            SWAP(INDEX, k, x, 0, chosen);                                                      \
            float pivot = k[0];                                                                \
            int64_t cut = NAME##_partition(k, x, m);                                           \
            if (count < low + cut) {                                                           \
                high = low + cut;                                                              \
            } else {                                                                           \
                low = low + cut;                                                               \
                last_pivot = pivot;                                                            \
                have_pivot = 1;                                                                \
            }                                                                                  \
        }                                                                                      \
        if (count > low) {                                                                     \
            /* The final insertion sort, stable, over the leaf holding the cut. */             \
            float *k = keys + low;                                                             \
            INDEX *x = index + low;                                                            \
            int64_t m = high - low;                                                            \
            for (int64_t i = 1; i < m; i++) {                                                  \
                float v = k[i];                                                                \
                INDEX u = x[i];                                                                \
                int64_t j = i;                                                                 \
                while (j > 0 && v > k[j - 1]) {                                                \
                    k[j] = k[j - 1];                                                           \
                    x[j] = x[j - 1];                                                           \
                    j--;                                                                       \
                }                                                                              \
                k[j] = v;                                                                      \
                x[j] = u;                                                                      \
            }                                                                                  \
            *threshold = keys[count - 1];                                                      \
        } else {                                                                               \
            if (!have_pivot)                                                                   \
                return 2;                                                                      \
            *threshold = last_pivot; /* the cut is a partition boundary */                     \
        }                                                                                      \
        return 0;                                                                              \
    }

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

DEFINE_FOLLOW(follow_i32_impl, int32_t)
DEFINE_FOLLOW(follow_i64_impl, int64_t)

EXPORT int mbuild_follow_i32(float *keys, int32_t *index, int64_t size, int64_t count, int64_t depth_limit,
                             float *threshold)
{
    return follow_i32_impl(keys, index, size, count, depth_limit, threshold);
}

EXPORT int mbuild_follow_i64(float *keys, int64_t *index, int64_t size, int64_t count, int64_t depth_limit,
                             float *threshold)
{
    return follow_i64_impl(keys, index, size, count, depth_limit, threshold);
}

/* A float32 value from a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array. */
static inline float load_value(const void *values, int bf16, int64_t j)
{
    if (!bf16)
        return ((const float *)values)[j];
    uint32_t bits = (uint32_t)((const uint16_t *)values)[j] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* A task vector: delta = model - base, both read as float32 (exact for bfloat16), as torch
 * subtracts the two converted tensors. */
EXPORT void mbuild_task_vector(const void *model, int model_bf16, const void *base, int base_bf16, int64_t size,
                               float *delta)
{
    for (int64_t j = 0; j < size; j++)
        delta[j] = load_value(model, model_bf16, j) - load_value(base, base_bf16, j);
}

/* TIES' thinning once the cut is known: delta * (|delta| > threshold), as torch multiplies
 * by the bool mask (a dropped negative becomes -0.0). Kept elements equal to the threshold
 * are the caller's to restore. */
EXPORT void mbuild_keep_above(float *delta, int64_t size, float threshold)
{
    for (int64_t j = 0; j < size; j++)
        delta[j] = delta[j] * (float)(fabsf(delta[j]) > threshold);
}

/* Columns per block: the block's sums stay in cache and each loop below vectorizes. */
#define COLUMNS 512

/* TIES' element-wise half for the sum consensus, in float32, one element at a time, with
 * exactly torch's operations in torch's order (mergekit's, as task_arithmetic._combine runs
 * them): w = delta * weight per model; the elected sign is + where the sum of w (from 0, in
 * model order) is >= 0; a model agrees where w has that sign (a zero agrees with neither);
 * mixed and divisor sum w * agree and weight * agree from 0 in model order; a zero divisor
 * becomes 1; then mixed / divisor (normalize), * lambda, and base + mixed.
 *
 * deltas: `rows` task vectors of `size` floats, one after another; base: `size` float32
 * (base_bf16 = 0) or bfloat16 (base_bf16 = 1) values; out: `size` float32. Rows at most 4:
 * up to 4 rows torch's dim-0 sum adds them one after another from +0, as here; from 5 it
 * groups them otherwise (found by comparing the two), so those are left to torch. */

EXPORT int mbuild_ties_combine(const float *deltas, int64_t rows, int64_t size, const float *weights,
                               const void *base, int base_bf16, int normalize, int scale, float lambda,
                               float *out)
{
    float total[COLUMNS], mixed[COLUMNS], divisor[COLUMNS];
    if (rows < 1 || rows > 4)
        return 1;
    for (int64_t start = 0; start < size; start += COLUMNS) {
        int n = size - start < COLUMNS ? (int)(size - start) : COLUMNS;
        for (int j = 0; j < n; j++)
            total[j] = 0.0f;
        for (int64_t i = 0; i < rows; i++) {
            const float *row = deltas + i * size + start;
            const float weight = weights[i];
            for (int j = 0; j < n; j++)
                total[j] = total[j] + row[j] * weight;
        }
        for (int j = 0; j < n; j++) {
            mixed[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (int64_t i = 0; i < rows; i++) {
            const float *row = deltas + i * size + start;
            const float weight = weights[i];
            for (int j = 0; j < n; j++) {
                float w = row[j] * weight;
                /* 1 where w has the elected sign, else 0; in arithmetic, so it vectorizes */
                float positive = (float)(total[j] >= 0.0f);
                float a = positive * (float)(w > 0.0f) + (1.0f - positive) * (float)(w < 0.0f);
                mixed[j] = mixed[j] + w * a;
                divisor[j] = divisor[j] + weight * a;
            }
        }
        for (int j = 0; j < n; j++) {
            float m = mixed[j];
            float d = divisor[j] + (float)(divisor[j] == 0.0f); /* a zero divisor becomes 1 */
            if (normalize)
                m = m / d;
            if (scale)
                m = m * lambda;
            out[start + j] = load_value(base, base_bf16, start + j) + m;
        }
    }
    return 0;
}

/* TIES in a 16-bit compute dtype (mergekit's `dtype: bfloat16` or `float16`), as torch's CPU
 * kernels compute it: every element-wise op on 16-bit tensors computes in float32 and rounds
 * its result to the 16-bit type, to nearest even (subnormals kept, as torch keeps them); a sum
 * over the models accumulates in float32 from +0, in model order, and rounds once. Each step
 * below is one of mergekit's torch ops, rounded where that op rounds. Dtype codes: 1 bfloat16,
 * 2 float16 (0, float32, is the loops above). */

static inline uint32_t float_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float bits_float(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* float16 bits to float32 (exact): the exponent rebiased by a product with 2^112, which also
 * normalizes subnormals; inf and NaN keep their payload. Branch-free, so loops vectorize. */
static inline float half_value(uint16_t half)
{
    uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
    uint32_t rest = (uint32_t)(half & 0x7FFFu) << 13;
    uint32_t finite = float_bits(bits_float(rest) * 0x1p112f);
    return bits_float((rest >= (0x7C00u << 13) ? rest | 0x7F800000u : finite) | sign);
}

/* float32 to float16 bits, rounded to nearest even as torch converts (F16C's vcvtps2ph):
 * overflow to inf, subnormal results rounded by a float addition that aligns their 10 bits,
 * NaN quieted. */
static inline uint16_t half_bits(float value)
{
    uint32_t bits = float_bits(value);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7FFFFFFFu;
    uint32_t normal = (magnitude - 0x38000000u + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
    uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - 0x3F000000u;
    uint32_t half = magnitude < 0x38800000u ? subnormal : normal; /* below 2^-14: subnormal */
    uint32_t special = magnitude > 0x7F800000u ? 0x7E00u | ((magnitude >> 13) & 0x3FFu) : 0x7C00u;
    half = magnitude >= 0x47800000u ? special : half; /* from 65536 on: inf (or NaN) */
    return (uint16_t)(half | sign);
}

/* float32 to bfloat16 bits, rounded to nearest even; NaN quieted. */
static inline uint16_t bf16_bits(float value)
{
    uint32_t bits = float_bits(value);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)((bits & 0x7FFFFFFFu) > 0x7F800000u ? (bits >> 16) | 0x0040u : rounded);
}

/* On x86 with GCC or Clang the combine below also has a form compiled for AVX2 and F16C, run
 * only where the CPU has them: float16 converted by the CPU (vcvtph2ps, exact; vcvtps2ph,
 * rounded to nearest even with subnormals kept: the same values as the code above). */
#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_F16C_PATH 1
#define V3_TARGET __attribute__((target("avx2,f16c")))
#endif

/* Element j of a 16-bit array (kind 1 bfloat16, 2 float16) as float32 (exact). */
static inline float load16(const uint16_t *values, int kind, int64_t j)
{
    return kind == 1 ? bits_float((uint32_t)values[j] << 16) : half_value(values[j]);
}

static inline uint16_t bits16(float value, int kind)
{
    return kind == 1 ? bf16_bits(value) : half_bits(value);
}

/* A float32 value rounded to the 16-bit type and back: the result of one torch op. */
static inline float round16(float value, int kind) { return load16((uint16_t[]){bits16(value, kind)}, kind, 0); }

/* |delta| as float32, as `delta.abs().float()` (both exact). */
EXPORT void mbuild_magnitudes16(const uint16_t *delta, int kind, int64_t size, float *out)
{
    if (kind == 1)
        for (int64_t j = 0; j < size; j++)
            out[j] = fabsf(load16(delta, 1, j));
    else
        for (int64_t j = 0; j < size; j++)
            out[j] = fabsf(load16(delta, 2, j));
}

/* mbuild_keep_above for a 16-bit delta: delta * (|delta| > threshold), the product of a
 * 16-bit value and 1 or 0: the value, or its sign alone (a dropped negative becomes -0.0).
 * The selection's threshold is finite, so an inf is kept (and never multiplied by 0). */
EXPORT void mbuild_keep_above16(uint16_t *delta, int kind, int64_t size, float threshold)
{
    if (kind == 1)
        for (int64_t j = 0; j < size; j++)
            delta[j] = fabsf(load16(delta, 1, j)) > threshold ? delta[j] : delta[j] & 0x8000u;
    else
        for (int64_t j = 0; j < size; j++)
            delta[j] = fabsf(load16(delta, 2, j)) > threshold ? delta[j] : delta[j] & 0x8000u;
}

/* mbuild_ties_combine in a 16-bit compute dtype, mergekit's ops with their roundings:
 * w = round(delta * weight) per model (the weights already rounded to the 16-bit type, as
 * torch.tensor(weights, dtype=...) makes them); the elected sign is + where round(sum of w)
 * >= 0 (the rounded sum, as torch compares it: a sum of 16-bit values cannot round to zero, so
 * its sign is the float32 sum's, but only the op's own rounding is certain to be torch's); a
 * model agrees where w has that sign; mixed = round(sum of w * agree), divisor = round(sum of
 * weight * agree), a zero divisor becomes 1; then round(mixed / divisor) (normalize),
 * round(* lambda) (lambda as float32, as torch takes a Python scalar) and round(base + mixed).
 * Sums run in float32 from +0 in model order. deltas, base and out: 16-bit arrays of `kind`. */
static inline __attribute__((always_inline)) void ties_combine16_block(
    const uint16_t *deltas, int64_t rows, int64_t size, const float *weights, const uint16_t *base, int kind,
    int normalize, int scale, float lambda, uint16_t *out, int64_t start, int n)
{
    float total[COLUMNS], mixed[COLUMNS], divisor[COLUMNS], positive[COLUMNS];
    for (int j = 0; j < n; j++)
        total[j] = 0.0f;
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *row = deltas + i * size + start;
        const float weight = weights[i];
        for (int j = 0; j < n; j++)
            total[j] = total[j] + round16(load16(row, kind, j) * weight, kind);
    }
    for (int j = 0; j < n; j++) {
        positive[j] = (float)(round16(total[j], kind) >= 0.0f);
        mixed[j] = 0.0f;
        divisor[j] = 0.0f;
    }
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *row = deltas + i * size + start;
        const float weight = weights[i];
        for (int j = 0; j < n; j++) {
            float w = round16(load16(row, kind, j) * weight, kind);
            float a = positive[j] * (float)(w > 0.0f) + (1.0f - positive[j]) * (float)(w < 0.0f);
            mixed[j] = mixed[j] + w * a;
            divisor[j] = divisor[j] + weight * a;
        }
    }
    for (int j = 0; j < n; j++) {
        float m = round16(mixed[j], kind);
        float d = round16(divisor[j], kind);
        d = d + (float)(d == 0.0f); /* a zero divisor becomes 1 */
        if (normalize)
            m = round16(m / d, kind);
        if (scale)
            m = round16(m * lambda, kind);
        out[start + j] = bits16(load16(base, kind, start + j) + m, kind);
    }
}

static void ties_combine16_portable(const uint16_t *deltas, int64_t rows, int64_t size, const float *weights,
                                    const uint16_t *base, int kind, int normalize, int scale, float lambda,
                                    uint16_t *out)
{
    for (int64_t start = 0; start < size; start += COLUMNS) {
        int n = size - start < COLUMNS ? (int)(size - start) : COLUMNS;
        if (kind == 1)
            ties_combine16_block(deltas, rows, size, weights, base, 1, normalize, scale, lambda, out, start, n);
        else
            ties_combine16_block(deltas, rows, size, weights, base, 2, normalize, scale, lambda, out, start, n);
    }
}

#ifdef HAVE_F16C_PATH
#include <immintrin.h>

/* Eight float16 values as float32, exactly (vcvtph2ps). */
V3_TARGET static inline __m256 half8_values(const uint16_t *values)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)values));
}

/* Eight float32 values as float16 bits, rounded to nearest even (vcvtps2ph), as half_bits. */
V3_TARGET static inline __m128i half8_bits(__m256 values)
{
    return _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* Eight bfloat16 values as float32 (exact). */
V3_TARGET static inline __m256 bf16x8_values(const uint16_t *values)
{
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)values));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Eight float32 values rounded to bfloat16, in the low half of each 32-bit lane, as bf16_bits. */
V3_TARGET static inline __m256i bf16x8_lanes(__m256 values)
{
    __m256i bits = _mm256_castps_si256(values);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x0040));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

V3_TARGET static inline __m256 vector_values(const uint16_t *values, int kind)
{
    return kind == 1 ? bf16x8_values(values) : half8_values(values);
}

V3_TARGET static inline __m256 vector_round(__m256 values, int kind)
{
    if (kind == 1)
        return _mm256_castsi256_ps(_mm256_slli_epi32(bf16x8_lanes(values), 16));
    return _mm256_cvtph_ps(half8_bits(values));
}

V3_TARGET static inline void vector_store(uint16_t *out, __m256 values, int kind)
{
    if (kind == 1) { /* pack the lanes' low halves (at most 0xFFFF: no saturation), in order */
        __m256i packed = _mm256_packus_epi32(bf16x8_lanes(values), _mm256_setzero_si256());
        _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xD8)));
    } else {
        _mm_storeu_si128((__m128i *)out, half8_bits(values));
    }
}

/* ties_combine16_block eight columns at a time, with the CPU's float16 conversions: the same
 * ops in the same order (the tests compare it with the portable loop and with torch). */
static inline __attribute__((always_inline)) V3_TARGET void ties_combine16_vector(
    const uint16_t *deltas, int64_t rows, int64_t size, const float *weights, const uint16_t *base, int kind,
    int normalize, int scale, float lambda, uint16_t *out)
{
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), factor = _mm256_set1_ps(lambda);
    int64_t whole = size / 8 * 8;
    for (int64_t j = 0; j < whole; j += 8) {
        __m256 w[4], total = zero, mixed = zero, divisor = zero;
        for (int64_t i = 0; i < rows; i++) {
            w[i] = vector_round(_mm256_mul_ps(vector_values(deltas + i * size + j, kind), _mm256_set1_ps(weights[i])), kind);
            total = _mm256_add_ps(total, w[i]);
        }
        __m256 positive = _mm256_cmp_ps(vector_round(total, kind), zero, _CMP_GE_OQ);
        for (int64_t i = 0; i < rows; i++) {
            __m256 agrees = _mm256_blendv_ps(_mm256_cmp_ps(w[i], zero, _CMP_LT_OQ), _mm256_cmp_ps(w[i], zero, _CMP_GT_OQ),
                                             positive);
            __m256 a = _mm256_and_ps(agrees, one); /* 1.0 or 0.0 */
            mixed = _mm256_add_ps(mixed, _mm256_mul_ps(w[i], a));
            divisor = _mm256_add_ps(divisor, _mm256_mul_ps(_mm256_set1_ps(weights[i]), a));
        }
        __m256 m = vector_round(mixed, kind);
        __m256 d = vector_round(divisor, kind);
        d = _mm256_add_ps(d, _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_EQ_OQ), one)); /* a zero divisor becomes 1 */
        if (normalize)
            m = vector_round(_mm256_div_ps(m, d), kind);
        if (scale)
            m = vector_round(_mm256_mul_ps(m, factor), kind);
        vector_store(out + j, _mm256_add_ps(vector_values(base + j, kind), m), kind);
    }
    if (whole < size)
        ties_combine16_block(deltas, rows, size, weights, base, kind, normalize, scale, lambda, out, whole,
                             (int)(size - whole));
}

/* The vector loop above, for either kind. */
V3_TARGET static void ties_combine16_v3(const uint16_t *deltas, int64_t rows, int64_t size, const float *weights,
                                        const uint16_t *base, int kind, int normalize, int scale, float lambda,
                                        uint16_t *out)
{
    if (kind == 1)
        ties_combine16_vector(deltas, rows, size, weights, base, 1, normalize, scale, lambda, out);
    else
        ties_combine16_vector(deltas, rows, size, weights, base, 2, normalize, scale, lambda, out);
}
#endif

/* Returns 0, or 1 for arguments it does not take (more than 4 rows, another kind).
 * portable = 1 runs the portable loops even where the AVX2 and F16C ones could (the tests
 * compare the two). */
EXPORT int mbuild_ties_combine16(const uint16_t *deltas, int64_t rows, int64_t size, const float *weights,
                                 const uint16_t *base, int kind, int normalize, int scale, float lambda,
                                 uint16_t *out, int portable)
{
    if (rows < 1 || rows > 4 || (kind != 1 && kind != 2))
        return 1;
#ifdef HAVE_F16C_PATH
    __builtin_cpu_init();
    if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
        ties_combine16_v3(deltas, rows, size, weights, base, kind, normalize, scale, lambda, out);
        return 0;
    }
#endif
    ties_combine16_portable(deltas, rows, size, weights, base, kind, normalize, scale, lambda, out);
    return 0;
}

/* One tensor's element-wise pass split over threads: parts of whole column blocks, none
 * smaller than 64 blocks; the caller's thread takes the first part (and any part a thread
 * could not be started for). Each part ORs its status into the result. */
typedef int (*part_function)(const void *arguments, int64_t begin, int64_t end);

struct part {
    part_function work;
    const void *arguments;
    int64_t begin, end;
    int status;
};

static void *run_part(void *part)
{
    struct part *p = (struct part *)part;
    p->status = p->work(p->arguments, p->begin, p->end);
    return NULL;
}

static int in_parts(part_function work, const void *arguments, int64_t size, int threads)
{
    enum { MOST_THREADS = 64 };
    struct part parts[MOST_THREADS];
#ifdef HAVE_THREADS
    pthread_t handles[MOST_THREADS];
#endif
    int started[MOST_THREADS];
    int64_t blocks = (size + COLUMNS - 1) / COLUMNS;
    if (threads > MOST_THREADS)
        threads = MOST_THREADS;
    if (blocks < (int64_t)threads * 64)
        threads = (int)(blocks / 64);
    if (threads < 1)
        threads = 1;
    int64_t per = (blocks + threads - 1) / threads * COLUMNS;
    for (int t = 0; t < threads; t++) {
        struct part part = {work, arguments, t * per < size ? t * per : size, (t + 1) * per < size ? (t + 1) * per : size, 0};
        parts[t] = part;
#ifdef HAVE_THREADS
        started[t] = t > 0 && pthread_create(&handles[t], NULL, run_part, &parts[t]) == 0;
#else
        started[t] = 0;
#endif
    }
    for (int t = 0; t < threads; t++)
        if (!started[t])
            run_part(&parts[t]);
    int status = 0;
    for (int t = 0; t < threads; t++) {
#ifdef HAVE_THREADS
        if (started[t])
            pthread_join(handles[t], NULL);
#endif
        status |= parts[t].status;
    }
    return status;
}

/* 1 where a float32 is inf or NaN; in arithmetic, so the loops around it vectorize. */
static inline int not_finite(float value) { return !(fabsf(value) <= 3.40282347e+38f); }

/* Store n float32 values as float32 (out_bf16 = 0) or as bfloat16 rounded to nearest even,
 * as torch converts (NaN is never stored: callers fail on non-finite values first).
 * out_bf16 = 2 stores bfloat16 and returns 1 where a value rounds to inf: the math's result
 * is then the bfloat16 value (a bfloat16 compute dtype), and it is what must be finite. */
static inline int store_values(const float *values, int n, void *out, int out_bf16, int64_t start)
{
    if (!out_bf16) {
        memcpy((float *)out + start, values, (size_t)n * sizeof(float));
        return 0;
    }
    uint16_t *to = (uint16_t *)out + start;
    int overflow = 0;
    for (int j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, &values[j], sizeof bits);
        to[j] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        overflow |= (to[j] & 0x7F80u) == 0x7F80u;
    }
    return out_bf16 == 2 && overflow;
}

/* linear.py's kernel as torch runs it, for each element: total = +0, then for each model in
 * order total = fma(x_i, weight_i, total) (torch's addcmul_ on float32 is one fused
 * multiply-add on AVX2 and AVX-512 builds, checked by the tests), then total / divisor when
 * normalizing; the result must be finite; it is stored as float32 or bfloat16. Inputs are
 * float32 or bfloat16, each element read as float32 (exact). FMA is a compiler target here,
 * so mbuild_has_fma must say the CPU has it before mbuild_linear runs the loop. */

struct linear_arguments {
    const void *const *inputs;
    const int *inputs_bf16;
    const float *weights;
    int64_t rows;
    float divisor;
    int normalize;
    void *out;
    int out_bf16;
};

FMA_TARGET static int linear_part(const void *arguments, int64_t begin, int64_t end)
{
    const struct linear_arguments *job = (const struct linear_arguments *)arguments;
    float total[COLUMNS];
    int bad = 0;
    for (int64_t start = begin; start < end; start += COLUMNS) {
        int n = end - start < COLUMNS ? (int)(end - start) : COLUMNS;
        for (int j = 0; j < n; j++)
            total[j] = 0.0f;
        for (int64_t i = 0; i < job->rows; i++) {
            const float weight = job->weights[i];
            const void *row = job->inputs[i];
            /* One loop per input dtype (a constant flag), so each vectorizes. */
            if (job->inputs_bf16[i])
                for (int j = 0; j < n; j++)
                    total[j] = fmaf(load_value(row, 1, start + j), weight, total[j]);
            else
                for (int j = 0; j < n; j++)
                    total[j] = fmaf(load_value(row, 0, start + j), weight, total[j]);
        }
        if (job->normalize)
            for (int j = 0; j < n; j++)
                total[j] = total[j] / job->divisor;
        for (int j = 0; j < n; j++)
            bad |= not_finite(total[j]);
        bad |= store_values(total, n, job->out, job->out_bf16, start);
    }
    return bad;
}

EXPORT int mbuild_has_fma(void)
{
#ifdef HAVE_FMA_CHECK
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* inputs: `rows` arrays of `size` elements (inputs_bf16[i]: bfloat16, else float32);
 * out: `size` elements (bfloat16 when out_bf16, else float32; 2: bfloat16 computed in bfloat16,
 * whose rounded values must be finite, see store_values). Returns 0, or 1 when some
 * result is not finite (the output is then not to be used), or 2 for bad arguments. */
EXPORT int mbuild_linear(const void *const *inputs, const int *inputs_bf16, int64_t rows, int64_t size,
                         const float *weights, int normalize, float divisor, void *out, int out_bf16, int threads)
{
    if (rows < 1 || size < 0 || !mbuild_has_fma())
        return 2;
    struct linear_arguments arguments = {inputs, inputs_bf16, weights, rows, divisor, normalize, out, out_bf16};
    return in_parts(linear_part, &arguments, size, threads);
}

/* slerp.py's last pass, once the weights are known: weight_a * a + weight_b * b in float32,
 * each product rounded, then the sum (torch's mul, then add_ of the other product); the
 * result must be finite; stored as float32 or bfloat16. a and b: float32 or bfloat16. */

struct slerp_arguments {
    const void *a;
    int a_bf16;
    const void *b;
    int b_bf16;
    float weight_a, weight_b;
    void *out;
    int out_bf16;
};

static int slerp_part(const void *arguments, int64_t begin, int64_t end)
{
    const struct slerp_arguments *job = (const struct slerp_arguments *)arguments;
    float result[COLUMNS];
    int bad = 0;
    for (int64_t start = begin; start < end; start += COLUMNS) {
        int n = end - start < COLUMNS ? (int)(end - start) : COLUMNS;
        for (int j = 0; j < n; j++) {
            float x = job->weight_a * load_value(job->a, job->a_bf16, start + j);
            float y = job->weight_b * load_value(job->b, job->b_bf16, start + j);
            result[j] = x + y;
        }
        for (int j = 0; j < n; j++)
            bad |= not_finite(result[j]);
        bad |= store_values(result, n, job->out, job->out_bf16, start);
    }
    return bad;
}

/* slerp.py's dot pass, one chunk: out = (a / norm_a) * (b / norm_b), each step rounded as
 * torch's division and multiplication are, from float32 or bfloat16 inputs; torch then sums
 * `out` exactly as it sums its own. */
EXPORT void mbuild_scaled_product(const void *a, int a_bf16, const void *b, int b_bf16, int64_t size, float norm_a,
                                  float norm_b, float *out)
{
    for (int64_t j = 0; j < size; j++)
        out[j] = (load_value(a, a_bf16, j) / norm_a) * (load_value(b, b_bf16, j) / norm_b);
}

/* Returns 0, or 1 when some result is not finite (the output is then not to be used);
 * out_bf16 as for mbuild_linear. */
EXPORT int mbuild_slerp_combine(const void *a, int a_bf16, const void *b, int b_bf16, int64_t size, float weight_a,
                                float weight_b, void *out, int out_bf16, int threads)
{
    struct slerp_arguments arguments = {a, a_bf16, b, b_bf16, weight_a, weight_b, out, out_bf16};
    return in_parts(slerp_part, &arguments, size, threads);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
