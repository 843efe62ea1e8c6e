/*
 * Compressed optimizer state, written once for every family.  bfloat16 is read and written by
 * the family's own loop, in registers (fo_state_get / fo_state_put in internal.h): one pass
 * over the arenas, as for float32.  int8 needs a block's new absmax before its codes, so a group
 * whose state is int8 is stepped tile by tile (FO_QBLOCK = 256 elements, one int8 block): each
 * state buffer the group uses is widened into a float32 tile on the stack (L1), the family's
 * loop runs on the tiles exactly as on float32 arenas, and the tiles are rounded back, before
 * the next tile is read: one pass over memory.  The rules (fastopt/_formats.py has them in
 * words and as NumPy twins, which the tests hold these to bit for bit):
 *
 * bfloat16  widen: bits << 16.  Nearest: (u + 0x7fff + (u >> 16 & 1)) >> 16.  Stochastic:
 *           (u + r) >> 16 with r the high 16 bits of mix32(key ^ low 32 bits of the element's
 *           arena index), key = a chain of mix32 over (seed, step, buffer, high index bits).
 *           A NaN becomes (u >> 16) | 0x40 (quiet, its sign kept).
 * int8      absmax = max |x| over the block.  Finite and > 0: code = the map entry nearest to
 *           n = x / absmax (IEEE division), an exact tie going to the smaller magnitude; found
 *           from the cell of |n|'s top 16 bits (the count of thresholds below the cell and the
 *           one threshold inside it, if any: one integer compare).  absmax 0: every code is
 *           0.0's.  A NaN or infinity in the block: absmax NaN (or +inf) and every code 0.0's,
 *           so the block reads back as NaN.  Widen: map[code] * absmax.
 *
 * Integer operations, one IEEE division and one multiply: the same bits on every ISA path.
 */
#include <float.h>

#include "internal.h"

#define ZERO_CODE_SIGNED 127u

/* lowbias32, Chris Wellons' 32-bit integer hash */
FO_INLINE uint32_t fo_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static uint32_t stream_key(uint64_t seed, int64_t step, unsigned buffer, uint32_t index_hi)
{
    const uint64_t s = (uint64_t)step;
    const uint32_t words[6] = {(uint32_t)seed, (uint32_t)(seed >> 32), (uint32_t)s,
                               (uint32_t)(s >> 32), buffer, index_hi};
    uint32_t h = 0;
    for (int i = 0; i < 6; i++)
        h = fo_mix32(h ^ words[i]);
    return h;
}

FO_INLINE void int8_widen(const uint8_t *restrict codes, float absmax,
                          const float *restrict map, float *restrict dst)
{
    for (size_t i = 0; i < FO_QBLOCK; i++)
        dst[i] = map[codes[i]] * absmax;
}

/* max |x| over a block as bits: for non-negative floats the integer order is the float order,
 * and every NaN and infinity lies above FLT_MAX's pattern (an integer max vectorizes; a float
 * max reduction does not without -ffast-math) */
FO_INLINE uint32_t int8_top(const float *restrict x)
{
    uint32_t top = 0;
    for (size_t i = 0; i < FO_QBLOCK; i++) {
        const uint32_t a = fo_bits(x[i]) & 0x7fffffffU;
        top = a > top ? a : top;
    }
    return top;
}

/* -> 1 for a block whose absmax is 0, infinite or NaN: every code is then 0.0's and *absmax
 * what the block stores (0, +inf or NaN); 0 for any other block (nothing written) */
FO_INLINE int int8_special(uint32_t top, uint8_t *restrict codes, int is_signed, float *absmax)
{
    if (top != 0 && top <= 0x7f7fffffU)
        return 0;
    memset(codes, is_signed ? ZERO_CODE_SIGNED : 0, FO_QBLOCK);
    *absmax = top > 0x7f800000U ? NAN : fo_float(top);    /* NaN, +inf or 0 */
    return 1;
}

/* The code of n = x / absmax (its bits u, |n| <= 1), by the cell of |n|'s top 16 bits: the count
 * of thresholds below the cell, plus one when |n| lies above the threshold inside it.  The
 * compare is strict for either sign: a magnitude on a threshold stays below it, which is the
 * smaller magnitude for a negative n as for a positive one (the signed map and its thresholds
 * are symmetric about 0). */
FO_INLINE uint8_t int8_code(uint32_t u, int is_signed, const uint32_t *restrict cells)
{
    const uint32_t mag = u & 0x7fffffffU;
    int32_t cell = (int32_t)(mag >> 16) - FO_CELL_BASE;
    cell = cell < 0 ? 0 : cell;
    cell = cell > FO_NCELLS - 1 ? FO_NCELLS - 1 : cell;
    const uint32_t e = cells[cell];
    const uint32_t m = (e >> 17) + ((mag & 0xffffU) > (e & 0x1ffffU));
    const uint32_t neg = u >> 31;
    uint32_t code;
    if (is_signed) {
        /* 128 positive thresholds, 127 negative ones: -1's side ends at the map's last entry */
        const uint32_t mneg = m > ZERO_CODE_SIGNED ? ZERO_CODE_SIGNED : m;
        code = neg ? ZERO_CODE_SIGNED - mneg : ZERO_CODE_SIGNED + m;
    } else {
        code = neg ? 0 : m;              /* a negative (or -0) n: the code of 0 */
    }
    return (uint8_t)code;
}

/* -> absmax; the codes of a block of FO_QBLOCK values */
FO_INLINE float int8_round(const float *restrict x, uint8_t *restrict codes, int is_signed,
                           const uint32_t *restrict cells)
{
    const uint32_t top = int8_top(x);
    float absmax;
    if (int8_special(top, codes, is_signed, &absmax))
        return absmax;
    const float mx = fo_float(top);
    for (size_t i = 0; i < FO_QBLOCK; i++)
        codes[i] = int8_code(fo_bits(x[i] / mx), is_signed, cells);
    return mx;
}

#if FO_HAVE_X86_64
#include <immintrin.h>

/* The int8 codecs with AVX2 (x86-64-v3; the v4 path calls them too).  GCC leaves the loops
 * above scalar (the table lookups map[codes[i]] and cells[cell]: "no vectype"), which made int8
 * state ~15x the cost of float32 (Adam, Zen 3).  Same operations as the scalar code, so the
 * same bits: an IEEE division (never a reciprocal: a subnormal absmax must work), integer
 * compares, one multiply.  The loops cover whole blocks (no scalar tail: a dead one only drew
 * GCC warnings). */
typedef char fo_qblock_is_32s[FO_QBLOCK % 32 ? -1 : 1];
typedef char fo_cells_reach_one[((0x3f800000 >> 16) - FO_CELL_BASE) < FO_NCELLS ? 1 : -1];
#define FO_V3_INLINE FO_TARGET_X86_64_V3 static inline __attribute__((always_inline))
#define FO_ALIGN32 __attribute__((aligned(32)))

/* The map lookup by eight scalar loads into one vector, not vgatherdps: on Zen 3 the gather
 * costs ~1.5 cycles an element and the loads half that (Adam with int8 state, in cache: 2.95
 * -> 2.55 ns an element).  Scalar loads stored into the tile and multiplied by vectors
 * afterwards measured slower still (2.3 -> 3.15). */
FO_TARGET_X86_64_V3 static void int8_widen_v3(const uint8_t *restrict codes, float absmax,
                                              const float *restrict map, float *restrict dst)
{
    const __m256 am = _mm256_set1_ps(absmax);
    for (size_t i = 0; i < FO_QBLOCK; i += 8) {
        uint64_t c;
        memcpy(&c, codes + i, sizeof c);
        const __m256 v = _mm256_setr_ps(map[c & 255], map[c >> 8 & 255], map[c >> 16 & 255],
                                        map[c >> 24 & 255], map[c >> 32 & 255],
                                        map[c >> 40 & 255], map[c >> 48 & 255], map[c >> 56]);
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, am));
    }
}

/* the cell of n (its bits u), clamped below at 0 by a saturating 16-bit subtract (mag >> 16
 * has its high half 0); never above the last, as |n| <= 1: |x| <= max |x| and the division is
 * monotone */
FO_V3_INLINE __m256i int8_cell_v3(__m256i u)
{
    const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    return _mm256_subs_epu16(_mm256_srli_epi32(mag, 16), _mm256_set1_epi32(FO_CELL_BASE));
}

/* the code of n (its bits u) from its cell's entry e, as int32 lanes, -1..255: -1 stands for
 * 0 */
FO_V3_INLINE __m256i int8_code_of_entry_v3(__m256i u, __m256i e, int is_signed)
{
    const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    /* m = count + (low > t), t = e & 0x1ffff <= 0x10000: with e ^ 0x1ffff = count << 17 |
     * (0x1ffff - t), adding low (<= 0xffff) carries into bit 17 exactly when low > t */
    const __m256i m = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_xor_si256(e, _mm256_set1_epi32(0x1ffff)),
                         _mm256_and_si256(mag, _mm256_set1_epi32(0xffff))), 17);
    /* the sign chosen by blendv_ps on the sign bit of n; a code below 0 (127 - 128 for
     * m = 128 on the negative side: -1's code is the map's first) is clamped to 0 by the
     * caller's unsigned saturating pack */
    const __m256 sign = _mm256_castsi256_ps(u);
    if (is_signed) {
        const __m256i zero = _mm256_set1_epi32(ZERO_CODE_SIGNED);
        return _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_add_epi32(zero, m)),
                             _mm256_castsi256_ps(_mm256_sub_epi32(zero, m)), sign));
    }
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(m),
                                                _mm256_setzero_ps(), sign));
}

FO_V3_INLINE float int8_round_v3_(const float *restrict x, uint8_t *restrict codes,
                                  const int is_signed, const uint32_t *restrict cells)
{
    const uint32_t top = int8_top(x);
    float absmax;
    if (int8_special(top, codes, is_signed, &absmax))
        return absmax;
    const float mx = fo_float(top);
    const __m256 vmx = _mm256_set1_ps(mx);
    /* packs/packus work within 128-bit lanes: the 32 codes come out as dwords
     * a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7, put in order by one dword permute */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* three passes: the cells by vectors, their entries by scalar loads (which keep to the
     * load ports: vpgatherdd cost ~10 cycles for 8 lanes on Zen 3, as much as the rest of
     * the rounding), the codes by vectors */
    FO_ALIGN32 uint32_t ubits[FO_QBLOCK], entry[FO_QBLOCK];
    for (size_t i = 0; i < FO_QBLOCK; i += 8) {
        const __m256i u = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x + i), vmx));
        _mm256_store_si256((__m256i *)(ubits + i), u);
        _mm256_store_si256((__m256i *)(entry + i), int8_cell_v3(u));
    }
    for (size_t i = 0; i < FO_QBLOCK; i += 8) {
        /* the cells two to a 64-bit load (the load ports are the limit here: 2.28 -> 2.19 ns
         * an element), and hidden from GCC, which would make this loop a gather again */
        uint64_t w[4];
        memcpy(w, entry + i, sizeof w);
        __asm__("" : "+r"(w[0]), "+r"(w[1]), "+r"(w[2]), "+r"(w[3]));
        for (int q = 0; q < 4; q++) {
            entry[i + 2 * q] = cells[(uint32_t)w[q]];
            entry[i + 2 * q + 1] = cells[w[q] >> 32];
        }
    }
    for (size_t i = 0; i < FO_QBLOCK; i += 32) {
#define FO_CODE_AT_(o) int8_code_of_entry_v3(_mm256_load_si256((const __m256i *)(ubits + i + o)), \
                                             _mm256_load_si256((const __m256i *)(entry + i + o)), \
                                             is_signed)
        const __m256i ab = _mm256_packs_epi32(FO_CODE_AT_(0), FO_CODE_AT_(8));
        const __m256i cd = _mm256_packs_epi32(FO_CODE_AT_(16), FO_CODE_AT_(24));
#undef FO_CODE_AT_
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        _mm256_storeu_si256((__m256i *)(codes + i), bytes);
    }
    return mx;
}

/* the signedness a constant in each loop (GCC did not unswitch it) */
FO_TARGET_X86_64_V3 static float int8_round_v3(const float *restrict x, uint8_t *restrict codes,
                                               int is_signed, const uint32_t *restrict cells)
{
    return is_signed ? int8_round_v3_(x, codes, 1, cells) : int8_round_v3_(x, codes, 0, cells);
}
#endif

/* The int8 tile loop at one ISA: the codecs above inline into it.  The group's range is on
 * whole blocks (fo_group), so every tile is one. */
FO_INLINE void tiles_body(const fo_call *c, const fo_group *g, size_t lo, size_t hi,
                          unsigned used, fo_body_fn body, const void *scalars, unsigned modes,
                          const int avx2)
{
    (void)avx2;
    const fo_state *st = c->state;
    const fo_stream none = {{0, 0, 0}, 0};
    float tile[FO_MAX_BUFFERS][FO_QBLOCK];
    size_t j = g->state_start + (lo - g->start);       /* the state element of `lo` */
    for (size_t t = lo; t < hi; t += FO_QBLOCK, j += FO_QBLOCK) {
        float *b[FO_MAX_BUFFERS] = {NULL, NULL, NULL};
        for (unsigned k = 0; k < FO_MAX_BUFFERS; k++) {
            if (!(used >> k & 1u))
                continue;
            b[k] = tile[k];
            const uint8_t *codes = st->codes[k] + j;
            const float absmax = st->absmax[k][j / FO_QBLOCK];
            const float *map = st->maps + 256 * (st->signed_mask >> k & 1u);
#if FO_HAVE_X86_64
            if (avx2)
                int8_widen_v3(codes, absmax, map, tile[k]);
            else
#endif
                int8_widen(codes, absmax, map, tile[k]);
        }
        body(c->param + t, c->grad + t, b[0], b[1], b[2], FO_QBLOCK, scalars, modes,
             FO_FMT_F32, none);
        for (unsigned k = 0; k < FO_MAX_BUFFERS; k++) {
            if (!(used >> k & 1u))
                continue;
            const unsigned sg = st->signed_mask >> k & 1u;
            uint8_t *codes = st->codes[k] + j;
            const uint32_t *cells = st->cells + FO_NCELLS * sg;
            float *absmax = &st->absmax[k][j / FO_QBLOCK];
#if FO_HAVE_X86_64
            if (avx2)
                *absmax = int8_round_v3(tile[k], codes, (int)sg, cells);
            else
#endif
                *absmax = int8_round(tile[k], codes, (int)sg, cells);
        }
    }
}

static void tiles_baseline(const fo_call *c, const fo_group *g, size_t lo, size_t hi,
                           unsigned used, fo_body_fn body, const void *s, unsigned modes)
{
    tiles_body(c, g, lo, hi, used, body, s, modes, 0);
}

#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3 static void tiles_x86_64_v3(const fo_call *c, const fo_group *g, size_t lo,
                                                size_t hi, unsigned used, fo_body_fn body,
                                                const void *s, unsigned modes)
{
    tiles_body(c, g, lo, hi, used, body, s, modes, 1);
}

FO_TARGET_X86_64_V4 static void tiles_x86_64_v4(const fo_call *c, const fo_group *g, size_t lo,
                                                size_t hi, unsigned used, fo_body_fn body,
                                                const void *s, unsigned modes)
{
    tiles_body(c, g, lo, hi, used, body, s, modes, 1);
}
#endif

void fo_range(const fo_call *c, const fo_group *g, size_t lo, size_t hi, unsigned used,
              fo_body_fn body, const void *scalars, unsigned modes)
{
    const fo_state *st = c->state;
    const int fmt = g->format;
    if (fmt == FO_FMT_INT8) {
#if FO_HAVE_X86_64
        switch (c->isa) {
        case FO_ISA_X86_64_V4: tiles_x86_64_v4(c, g, lo, hi, used, body, scalars, modes); return;
        case FO_ISA_X86_64_V3: tiles_x86_64_v3(c, g, lo, hi, used, body, scalars, modes); return;
        default: break;
        }
#endif
        tiles_baseline(c, g, lo, hi, used, body, scalars, modes);
        return;
    }
    const size_t at = g->state_start + (lo - g->start);   /* the state element of `lo` */
    void *b[FO_MAX_BUFFERS];
    for (unsigned k = 0; k < FO_MAX_BUFFERS; k++)
        b[k] = !(used >> k & 1u) ? NULL
               : fmt == FO_FMT_F32 ? (void *)(st->f32[k] + at) : (void *)(st->bf16[k] + at);
    fo_stream sr = {{0, 0, 0}, 0};
    if (fmt != FO_FMT_BF16_SR) {
        body(c->param + lo, c->grad + lo, b[0], b[1], b[2], hi - lo, scalars, modes, fmt, sr);
        return;
    }
    /* the random stream of an element is fixed by its arena index: a range that crosses a
     * multiple of 2^32 is stepped in parts, each with its keys */
    for (size_t t = lo; t < hi;) {
        const uint64_t index = st->index_base + t;
        const uint32_t hi32 = (uint32_t)(index >> 32), lo32 = (uint32_t)index;
        const uint64_t room = ((uint64_t)1 << 32) - lo32;
        const size_t part = (uint64_t)(hi - t) < room ? hi - t : (size_t)room;
        for (unsigned q = 0; q < FO_MAX_BUFFERS; q++)
            sr.key[q] = stream_key(g->seed, g->step, q, hi32);
        sr.index = lo32;
        uint16_t *p[FO_MAX_BUFFERS];
        for (unsigned k = 0; k < FO_MAX_BUFFERS; k++)
            p[k] = b[k] ? (uint16_t *)b[k] + (t - lo) : NULL;
        body(c->param + t, c->grad + t, p[0], p[1], p[2], part, scalars, modes, fmt, sr);
        t += part;
    }
}
