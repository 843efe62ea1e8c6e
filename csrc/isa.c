/* Which instruction-set paths this build has, which this CPU runs, and the thread split. */
#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int fo_isa_supported(fo_isa isa)
{
    switch (isa) {
    case FO_ISA_BASELINE:
        return 1;
#if FO_HAVE_X86_64
    case FO_ISA_X86_64_V3:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case FO_ISA_X86_64_V4:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    case FO_ISA_X86_64_V3:
    case FO_ISA_X86_64_V4:
        return 0;
#endif
    }
    return 0;
}

fo_isa fo_best_isa(void)
{
    if (fo_isa_supported(FO_ISA_X86_64_V4))
        return FO_ISA_X86_64_V4;
    if (fo_isa_supported(FO_ISA_X86_64_V3))
        return FO_ISA_X86_64_V3;
    return FO_ISA_BASELINE;
}

const char *fo_isa_name(fo_isa isa)
{
    switch (isa) {
    case FO_ISA_BASELINE:
        return "baseline";
    case FO_ISA_X86_64_V3:
        return "x86-64-v3";
    case FO_ISA_X86_64_V4:
        return "x86-64-v4";
    }
    return "unknown";
}

const char *fo_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
#define FO_STR_(x) #x
#define FO_STR(x) FO_STR_(x)
    return "msvc " FO_STR(_MSC_FULL_VER);
#else
    return "unknown";
#endif
}

const char *fo_compile_flags(void)
{
#ifdef FASTOPT_COMPILE_ARGS
    return FASTOPT_COMPILE_ARGS;
#else
    return "";
#endif
}

int fo_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The part [vlo, vhi) of the groups' elements taken end to end. */
static void run_span(const void *groups, size_t ngroups, size_t stride, size_t granule,
                     fo_range_fn fn, const void *ctx, size_t vlo, size_t vhi)
{
    size_t off = 0;
    for (size_t i = 0; i < ngroups && off < vhi; i++) {
        const void *g = (const char *)groups + i * stride;
        const size_t start = ((const size_t *)g)[0], stop = ((const size_t *)g)[1];
        const size_t len = stop - start;
        /* the cuts inside this group, moved down to its granules (the same function of the
         * same cut on both sides of it: the threads' parts still tile the group) */
        size_t lo = (vlo > off ? vlo : off) - off;
        size_t hi = (vhi < off + len ? vhi : off + len) - off;
        if (lo < len)
            lo -= lo % granule;
        if (hi < len)
            hi -= hi % granule;
        if (lo < hi)
            fn(ctx, g, start + lo, start + hi);
        off += len;
    }
}

void fo_run_groups(const fo_exec *ex, const void *groups, size_t ngroups, size_t stride,
                   size_t granule, fo_range_fn fn, const void *ctx)
{
    size_t total = 0;
    for (size_t i = 0; i < ngroups; i++) {
        const size_t *g = (const size_t *)((const char *)groups + i * stride);
        total += g[1] - g[0];
    }
#ifdef _OPENMP
    int nt = ex->num_threads;
    if (nt > 1) {
        const size_t per = ex->min_per_thread ? ex->min_per_thread : 1;
        const size_t cap = total / per;
        if (cap < (size_t)nt)
            nt = (int)cap;
    }
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            /* the team may be smaller than asked for: split by its real size */
            const size_t team = (size_t)omp_get_num_threads();
            const size_t t = (size_t)omp_get_thread_num();
            const size_t line = 64 / sizeof(float);
            const size_t chunk = ((total + team - 1) / team + line - 1) / line * line;
            const size_t vlo = t * chunk < total ? t * chunk : total;
            const size_t vhi = vlo + chunk < total ? vlo + chunk : total;
            run_span(groups, ngroups, stride, granule, fn, ctx, vlo, vhi);
        }
        return;
    }
#else
    (void)ex;
#endif
    run_span(groups, ngroups, stride, granule, fn, ctx, 0, total);
}
