/*
 * Memory-bandwidth probes: an optimizer's memory traffic with next to no arithmetic, threaded
 * exactly as the kernels are (fo_run_groups), so that a benchmark can put a kernel's GB/s
 * beside what this machine moves with the same access pattern in the same run.
 *   r4w3:  a += b;  c += b;  d += b     reads 4 streams, writes 3 (Adam, AdamW)
 *   r3w2:  a += b;  c += b              reads 3 streams, writes 2 (SGD+momentum, RMSprop)
 */
#include "internal.h"

typedef struct { size_t start, stop; } span;

typedef struct {
    fo_isa isa;
    float *a, *c, *d;
    const float *b;
} probe_ctx;

FO_INLINE void r4w3_body(float *restrict a, const float *restrict b, float *restrict c,
                         float *restrict d, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const float x = b[i];
        a[i] += x;
        c[i] += x;
        d[i] += x;
    }
}

FO_INLINE void r3w2_body(float *restrict a, const float *restrict b, float *restrict c,
                         size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const float x = b[i];
        a[i] += x;
        c[i] += x;
    }
}

static void r4w3_baseline(float *restrict a, const float *restrict b, float *restrict c,
                          float *restrict d, size_t n) { r4w3_body(a, b, c, d, n); }
static void r3w2_baseline(float *restrict a, const float *restrict b, float *restrict c,
                          size_t n) { r3w2_body(a, b, c, n); }
#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3 static void r4w3_x86_64_v3(float *restrict a, const float *restrict b,
                                               float *restrict c, float *restrict d, size_t n)
{ r4w3_body(a, b, c, d, n); }
FO_TARGET_X86_64_V3 static void r3w2_x86_64_v3(float *restrict a, const float *restrict b,
                                               float *restrict c, size_t n)
{ r3w2_body(a, b, c, n); }
#endif

static void r4w3_range(const void *ctx, const void *group, size_t lo, size_t hi)
{
    const probe_ctx *p = ctx;
    (void)group;
#if FO_HAVE_X86_64
    if (p->isa != FO_ISA_BASELINE) {
        r4w3_x86_64_v3(p->a + lo, p->b + lo, p->c + lo, p->d + lo, hi - lo);
        return;
    }
#endif
    r4w3_baseline(p->a + lo, p->b + lo, p->c + lo, p->d + lo, hi - lo);
}

static void r3w2_range(const void *ctx, const void *group, size_t lo, size_t hi)
{
    const probe_ctx *p = ctx;
    (void)group;
#if FO_HAVE_X86_64
    if (p->isa != FO_ISA_BASELINE) {
        r3w2_x86_64_v3(p->a + lo, p->b + lo, p->c + lo, hi - lo);
        return;
    }
#endif
    r3w2_baseline(p->a + lo, p->b + lo, p->c + lo, hi - lo);
}

void fo_probe_r4w3(const fo_exec *ex, float *restrict a, const float *restrict b,
                   float *restrict c, float *restrict d, size_t n)
{
    const probe_ctx p = {ex->isa, a, c, d, b};
    const span all = {0, n};
    fo_run_groups(ex, &all, 1, sizeof all, 1, r4w3_range, &p);
}

void fo_probe_r3w2(const fo_exec *ex, float *restrict a, const float *restrict b,
                   float *restrict c, size_t n)
{
    const probe_ctx p = {ex->isa, a, c, NULL, b};
    const span all = {0, n};
    fo_run_groups(ex, &all, 1, sizeof all, 1, r3w2_range, &p);
}
