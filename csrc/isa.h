/*
 * Internal: how each kernel is compiled once per instruction-set path.
 *
 * A family writes its loop once, as an always-inline body, and instantiates it in a plain
 * function (the baseline) and in one marked FO_TARGET_X86_64_V3.  Inlining the same body into
 * both is what keeps the paths bitwise identical: the arithmetic is the same explicit fmaf /
 * sqrtf / divide sequence, only the vector width differs.  GCC and Clang accept inlining a
 * default-target body into a caller with a wider target.
 */
#ifndef FASTOPT_ISA_H
#define FASTOPT_ISA_H

#include "fastopt.h"

#define FO_INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FO_HAVE_X86_64_V3 1
#define FO_TARGET_X86_64_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define FO_HAVE_X86_64_V3 0
#endif

/* Scalars are computed in double and rounded to float32 once, as torch's fused kernels do. */
FO_INLINE float fo_f32(double x) { return (float)x; }

#endif /* FASTOPT_ISA_H */
