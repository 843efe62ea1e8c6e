/*
 * Gradient norms for clipping, and the non-finite check, in one pass.
 *
 *   p = 2:    sqrt(sum g^2)      p = 1:  sum |g|      p = inf:  max |g|
 *   other p:  (sum |g|^p)^(1/p)
 * Sums are accumulated in double, so the norm is exact to double rounding at 1e8 elements.
 * The result is deterministic: the buffer is cut into fixed blocks of FO_NORM_BLOCK elements,
 * each block summed in a fixed order (see block_reduce), and the block sums added in order at
 * the end, so
 * neither the thread count nor the vector width changes a bit.  A NaN anywhere makes the norm
 * NaN (as torch's), and *nonfinite reports whether any element was NaN or infinite.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { NORM_L2 = 0, NORM_L1 = 1, NORM_INF = 2, NORM_P = 3 };

/* L2, L1 and max norms of a block in four-double vectors (GCC/Clang vector extensions): each
 * lane is an IEEE double operation, so the sums come out the same whatever the hardware
 * vector width; element i goes to lane i % 16, and the lanes are combined in a fixed tree. */
#if FO_GNU
#if defined(__GNUC__) && !defined(__clang__)
/* the 32-byte vector helpers are always inlined, so the ABI note about passing them without
 * AVX never applies */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef long long v4l __attribute__((vector_size(32)));

FO_INLINE v4d load4(const float *p)
{
    v4f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v4d);
}

FO_INLINE v4d vabs(v4d x)
{
    const v4l sign = {INT64_MIN, INT64_MIN, INT64_MIN, INT64_MIN};
    return (v4d)((v4l)x & ~sign);
}

/* max that propagates NaN: take x where x > acc or x is NaN */
FO_INLINE v4d vmax_nan(v4d acc, v4d x)
{
    const v4l take = (v4l)(x > acc) | (v4l)(x != x);
    return (v4d)(((v4l)x & take) | ((v4l)acc & ~take));
}
#endif /* FO_GNU; elsewhere block_reduce keeps the same lanes in an array */

FO_INLINE double max_nan(double a, double b)
{
    return (b > a || b != b) ? b : a;
}

FO_INLINE double block_reduce(const float *restrict g, size_t n, const int kind, double p,
                              int *restrict bad)
{
    if (kind == NORM_P) {
        /* rare: a plain fixed-order loop; |x|^p can overflow, so each element is checked */
        double acc = 0.0;
        int nonfinite = 0;
        for (size_t i = 0; i < n; i++) {
            const double x = fabs((double)g[i]);
            nonfinite |= !(x <= DBL_MAX);
            acc += pow(x, p);
        }
        *bad |= nonfinite;
        return acc;
    }
#if FO_GNU
    v4d a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const v4d x0 = load4(g + i), x1 = load4(g + i + 4);
        const v4d x2 = load4(g + i + 8), x3 = load4(g + i + 12);
        if (kind == NORM_L2) {
            a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3;
        } else if (kind == NORM_L1) {
            a0 += vabs(x0); a1 += vabs(x1); a2 += vabs(x2); a3 += vabs(x3);
        } else {
            a0 = vmax_nan(a0, vabs(x0)); a1 = vmax_nan(a1, vabs(x1));
            a2 = vmax_nan(a2, vabs(x2)); a3 = vmax_nan(a3, vabs(x3));
        }
    }
    double r;
    if (kind == NORM_INF) {
        const v4d m = vmax_nan(vmax_nan(a0, a1), vmax_nan(a2, a3));
        r = max_nan(max_nan(m[0], m[1]), max_nan(m[2], m[3]));
        for (; i < n; i++)
            r = max_nan(r, fabs((double)g[i]));
    } else {
        const v4d s = (a0 + a1) + (a2 + a3);
        r = (s[0] + s[1]) + (s[2] + s[3]);
        for (; i < n; i++) {
            const double x = (double)g[i];
            r += kind == NORM_L2 ? x * x : fabs(x);
        }
    }
#else
    /* the same lanes, one double each: lane k of 16 holds elements i + k (lanes 0-3 are a0,
     * 4-7 a1, 8-11 a2, 12-15 a3 above), combined in the same tree */
    double a[16] = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int k = 0; k < 16; k++) {
            const double x = (double)g[i + k];
            if (kind == NORM_L2)
                a[k] += x * x;
            else if (kind == NORM_L1)
                a[k] += fabs(x);
            else
                a[k] = max_nan(a[k], fabs(x));
        }
    }
    double r;
    if (kind == NORM_INF) {
        double m[4];
        for (int k = 0; k < 4; k++)
            m[k] = max_nan(max_nan(a[k], a[4 + k]), max_nan(a[8 + k], a[12 + k]));
        r = max_nan(max_nan(m[0], m[1]), max_nan(m[2], m[3]));
        for (; i < n; i++)
            r = max_nan(r, fabs((double)g[i]));
    } else {
        double s[4];
        for (int k = 0; k < 4; k++)
            s[k] = (a[k] + a[4 + k]) + (a[8 + k] + a[12 + k]);
        r = (s[0] + s[1]) + (s[2] + s[3]);
        for (; i < n; i++) {
            const double x = (double)g[i];
            r += kind == NORM_L2 ? x * x : fabs(x);
        }
    }
#endif
    /* float32 squares (or absolute values) cannot overflow a double sum of a block, so a
     * non-finite block result means a NaN or infinite element */
    *bad |= !(fabs(r) <= DBL_MAX);
    return r;
}

static double block_baseline(const float *restrict g, size_t n, int kind, double p, int *bad)
{
    switch (kind) {
    case NORM_L2: return block_reduce(g, n, NORM_L2, p, bad);
    case NORM_L1: return block_reduce(g, n, NORM_L1, p, bad);
    case NORM_INF: return block_reduce(g, n, NORM_INF, p, bad);
    default: return block_reduce(g, n, NORM_P, p, bad);
    }
}

#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3
static double block_x86_64_v3(const float *restrict g, size_t n, int kind, double p, int *bad)
{
    switch (kind) {
    case NORM_L2: return block_reduce(g, n, NORM_L2, p, bad);
    case NORM_L1: return block_reduce(g, n, NORM_L1, p, bad);
    case NORM_INF: return block_reduce(g, n, NORM_INF, p, bad);
    default: return block_reduce(g, n, NORM_P, p, bad);
    }
}
#endif

size_t fo_norm_blocks(size_t n)
{
    return (n + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK;
}

static int norm_kind(double norm_type)
{
    return norm_type == 2.0 ? NORM_L2 : norm_type == 1.0 ? NORM_L1
         : isinf(norm_type) ? NORM_INF : NORM_P;
}

void fo_norm_block_sums(const fo_exec *ex, const float *restrict grad, size_t n,
                        double norm_type, double *restrict block_sums, int *nonfinite)
{
    const int kind = norm_kind(norm_type);
    const size_t nblocks = fo_norm_blocks(n);
    int bad = 0;
    int nt = 1;
    (void)ex;   /* only threads and ISA paths read it */
#ifdef _OPENMP
    nt = ex->num_threads;
    if (nt > 1) {
        const size_t per = ex->min_per_thread ? ex->min_per_thread : 1;
        if (n / per < (size_t)nt)
            nt = (int)(n / per);
    }
#endif
    if (nt < 1)
        nt = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) reduction(|:bad) if(nt > 1)
#endif
    for (size_t b = 0; b < nblocks; b++) {
        const size_t lo = b * FO_NORM_BLOCK;
        const size_t len = n - lo < FO_NORM_BLOCK ? n - lo : FO_NORM_BLOCK;
#if FO_HAVE_X86_64
        if (ex->isa != FO_ISA_BASELINE) {
            block_sums[b] = block_x86_64_v3(grad + lo, len, kind, norm_type, &bad);
            continue;
        }
#endif
        block_sums[b] = block_baseline(grad + lo, len, kind, norm_type, &bad);
    }
    (void)nt;
    *nonfinite = bad;
}

double fo_norm_combine(const double *block_sums, size_t nblocks, double norm_type)
{
    const int kind = norm_kind(norm_type);
    double total = 0.0;
    for (size_t b = 0; b < nblocks; b++) {
        if (kind == NORM_INF)
            total = (block_sums[b] > total || block_sums[b] != block_sums[b]) ? block_sums[b] : total;
        else
            total += block_sums[b];
    }
    if (kind == NORM_L2)
        return sqrt(total);
    if (kind == NORM_P)
        return pow(total, 1.0 / norm_type);
    return total;
}

double fo_grad_norm(const fo_exec *ex, const float *restrict grad, size_t n, double norm_type,
                    double *restrict block_sums, int *nonfinite)
{
    fo_norm_block_sums(ex, grad, n, norm_type, block_sums, nonfinite);
    return fo_norm_combine(block_sums, fo_norm_blocks(n), norm_type);
}
