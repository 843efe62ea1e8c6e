/*
 * Gradient norms for clipping, and the non-finite check, in one pass.
 *
 *   p = 2:    sqrt(sum g^2)      p = 1:  sum |g|      p = inf:  max |g|
 *   other p:  (sum |g|^p)^(1/p)
 * Sums are accumulated in double, so the norm is exact to double rounding at 1e8 elements.
 * The result is deterministic: the buffer is cut into fixed blocks of FO_NORM_BLOCK elements,
 * each block summed in a fixed order (eight running sums, element i into sum i % 8, which no
 * compiler may reorder without -ffast-math), and the block sums added in order at the end, so
 * neither the thread count nor the vector width changes a bit.  A NaN anywhere makes the norm
 * NaN (as torch's), and *nonfinite reports whether any element was NaN or infinite.
 */
#include <float.h>
#include <math.h>

#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { NORM_L2 = 0, NORM_L1 = 1, NORM_INF = 2, NORM_P = 3 };

FO_INLINE double block_reduce(const float *restrict g, size_t n, const int kind, double p,
                              int *restrict bad)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int nonfinite = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) {
            const double x = fabs((double)g[i + j]);
            nonfinite |= !(x <= DBL_MAX);              /* NaN or inf */
            if (kind == NORM_L2)
                acc[j] += x * x;
            else if (kind == NORM_L1)
                acc[j] += x;
            else if (kind == NORM_INF)
                acc[j] = (x > acc[j] || x != x) ? x : acc[j];   /* NaN propagates */
            else
                acc[j] += pow(x, p);
        }
    }
    for (int j = 0; i < n; i++, j++) {
        const double x = fabs((double)g[i]);
        nonfinite |= !(x <= DBL_MAX);
        if (kind == NORM_L2)
            acc[j] += x * x;
        else if (kind == NORM_L1)
            acc[j] += x;
        else if (kind == NORM_INF)
            acc[j] = (x > acc[j] || x != x) ? x : acc[j];
        else
            acc[j] += pow(x, p);
    }
    *bad |= nonfinite;
    if (kind == NORM_INF) {
        double m = acc[0];
        for (int j = 1; j < 8; j++)
            m = (acc[j] > m || acc[j] != acc[j]) ? acc[j] : m;
        return m;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
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

double fo_grad_norm(const fo_exec *ex, const float *restrict grad, size_t n, double norm_type,
                    double *restrict block_sums, int *nonfinite)
{
    const int kind = norm_type == 2.0 ? NORM_L2 : norm_type == 1.0 ? NORM_L1
                   : isinf(norm_type) ? NORM_INF : NORM_P;
    const size_t nblocks = fo_norm_blocks(n);
    int bad = 0;
    int nt = 1;
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
