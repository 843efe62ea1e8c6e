/*
 * Internal to csrc/: how each kernel is compiled once per instruction-set path, and how a
 * call's groups are spread over threads.
 *
 * A family writes its loop once, as an always-inline body, and instantiates it in a plain
 * function (the baseline) and in functions marked FO_TARGET_X86_64_V3 / _V4.  Inlining the
 * same body into each is what keeps the paths bitwise identical: the arithmetic is the same
 * explicit fmaf / sqrtf / divide sequence, only the vector width differs.  GCC and Clang
 * accept inlining a default-target body into a caller with a wider target.
 */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include "fastopt.h"

#define FO_INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FO_HAVE_X86_64 1
#define FO_TARGET_X86_64_V3 __attribute__((target("arch=x86-64-v3")))
#define FO_TARGET_X86_64_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define FO_HAVE_X86_64 0
#endif

/* Scalars are computed in double and rounded to float32 once, as torch's fused kernels do. */
FO_INLINE float fo_f32(double x) { return (float)x; }

/* The gradient factor with maximize's sign folded in: g * (+-m) == +-(g * m) exactly. */
FO_INLINE float fo_grad_factor(const fo_grad_opts *g, int maximize)
{
    const float m = fo_f32(g->grad_multiplier);
    return maximize ? -m : m;
}

/* Runs fn(ctx, group, lo, hi) over every group's range, split over up to ex->num_threads
 * threads in one parallel region: the groups' elements, taken end to end, are cut into equal
 * chunks of whole 64-byte lines, one chunk a thread.  Each group struct starts with its
 * size_t start and stop; `stride` is the struct's size. */
typedef void (*fo_range_fn)(const void *ctx, const void *group, size_t lo, size_t hi);
void fo_run_groups(const fo_exec *ex, const void *groups, size_t ngroups, size_t stride,
                   fo_range_fn fn, const void *ctx);

#endif /* FASTOPT_INTERNAL_H */
