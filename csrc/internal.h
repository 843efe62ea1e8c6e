/*
 * Internal to csrc/: how a family is declared, how each kernel is compiled once per
 * instruction-set path, and how a call's groups are spread over threads.
 *
 * A family (one file in csrc/families/) writes its equations, its hyperparameter struct, its
 * per-step scalar preparation and its loop, as an always-inline body; FO_FAMILY then
 * instantiates the body in a plain function (the baseline) and in functions marked
 * FO_TARGET_X86_64_V3 / _V4, once per combination of mode bits, and defines the family's
 * fo_family record.  Inlining the same body into each is what keeps the paths bitwise
 * identical: the arithmetic is the same explicit fmaf / sqrtf / divide sequence, only the
 * vector width differs.  GCC and Clang accept inlining a default-target body into a caller
 * with a wider target; other compilers get the baseline alone (see FO_GNU below).
 */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fastopt.h"

/* The compiler-specific parts, and the portable path for every other C compiler (MSVC):
 * FO_GNU is 1 for GCC and Clang, which have always_inline, GCC's vector extensions and
 * function multiversioning by target attribute; elsewhere kernels are plain C99 compiled once
 * for the compiler's default target (build_info() then lists only "baseline").  Building with
 * -DFO_PORTABLE takes the portable path under GCC too, which is how it is tested here
 * (.ci/portable). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FO_PORTABLE)
#define FO_GNU 1
#define FO_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FO_GNU 0
#define FO_INLINE static __forceinline
#else
#define FO_GNU 0
#define FO_INLINE static inline
#endif

#if defined(__x86_64__) && FO_GNU
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

/* torch's lerp(a, b, w) for a float32 weight w, as ATen computes it: fma(w, b-a, a) when
 * |w| < 0.5, else fma(w-1, b-a, b).  The choice is made once per step (fo_lerp_weight) so
 * that the loop stays branch-free. */
typedef struct {
    float coeff;        /* w, or w-1 when from_end */
    int from_end;
} fo_lerp;

FO_INLINE fo_lerp fo_lerp_weight(float w)
{
    fo_lerp l;
    l.from_end = !(fabsf(w) < 0.5f);
    l.coeff = l.from_end ? w - 1.0f : w;
    return l;
}

FO_INLINE float fo_lerp_apply(fo_lerp l, float a, float b)
{
    return fmaf(l.coeff, b - a, l.from_end ? b : a);
}

/* The first half of Adam, AdamW, NAdam and RAdam, in torch's order: the weight decay, either
 * L2 into the gradient, g = fma(p, f(wd), g), or decoupled on the param, p = p * f(1 - lr*wd)
 * (a factor of exactly 1 otherwise); then m = lerp(m, g, f(1-beta1)) and
 * v = fma(f(1-beta2)*g, g, v*f(beta2)) (torch's addcmul).  Prepared once per step. */
typedef struct {
    float weight_decay, decay, beta2, one_minus_beta2;
    fo_lerp lerp;
} fo_moments;

typedef struct {
    float g, p, m, v;   /* the gradient (with L2), the decayed param, the new m and v */
} fo_moments_out;

/* -> 1 when the weight decay is L2 (the body's mode bit for it) */
FO_INLINE int fo_moments_prepare(fo_moments *a, double lr, double beta1, double beta2,
                                 double weight_decay, int decoupled)
{
    a->weight_decay = fo_f32(weight_decay);
    a->decay = decoupled ? fo_f32(1.0 - lr * weight_decay) : 1.0f;
    a->beta2 = fo_f32(beta2);
    a->one_minus_beta2 = fo_f32(1.0 - beta2);
    a->lerp = fo_lerp_weight(fo_f32(1.0 - beta1));
    return !decoupled && weight_decay != 0.0;
}

FO_INLINE fo_moments_out fo_moments_apply(fo_moments a, int l2, float g, float p, float m,
                                          float v)
{
    fo_moments_out o;
    o.g = l2 ? fmaf(p, a.weight_decay, g) : g;
    o.p = p * a.decay;
    o.m = fo_lerp_apply(a.lerp, m, o.g);
    o.v = fmaf(a.one_minus_beta2 * o.g, o.g, v * a.beta2);
    return o;
}

/* Mode bits: each family's prepare() returns the bits its body switches on, from FO_MODE(0)
 * up; the framework adds FO_ZERO_GRAD.  Every combination is its own branch-free loop. */
#define FO_ZERO_GRAD 1u
#define FO_MODE(k) (2u << (k))

/* The gradient as a body reads it: times the factor, and zeroed behind it when asked (modes
 * is a constant in each instantiation, so the test costs nothing). */
FO_INLINE float fo_read_grad(float *restrict grad, size_t i, float factor, unsigned modes)
{
    const float g = grad[i] * factor;
    if (modes & FO_ZERO_GRAD)
        grad[i] = 0.0f;
    return g;
}

/* What a family's range function is handed: the ISA, the buffers and the call's options. */
typedef struct {
    fo_isa isa;
    float *param, *grad;
    const fo_state *state;
    const fo_grad_opts *opts;
} fo_call;

/* A family's loop at one ISA, as the state formats call it on a tile of float32 state. */
typedef void (*fo_body_fn)(float *param, float *grad, float *s0, float *s1, float *s2, size_t n,
                           const void *scalars, unsigned modes);

/* Group `g`'s range [lo, hi) when its state is stored in a compressed format (csrc/formats.c):
 * tile by tile (FO_QBLOCK elements), the used buffers widened into float32 tiles, `body`
 * run on them, and the tiles rounded back, in one pass. */
void fo_tiles(const fo_call *c, const fo_group *g, size_t lo, size_t hi, unsigned used,
              fo_body_fn body, const void *scalars, unsigned modes);

/* ---- declaring a family ----------------------------------------------------------------
 *
 * In csrc/families/NAME.c, after the equations:
 *
 *   #define NAME_FIELDS(X) X(double, lr) X(double, beta1) X(int32_t, maximize) ...
 *   FO_HPARAMS(NAME, NAME_FIELDS)           -> typedef struct {...} NAME_hparams, field table
 *   static const char *const NAME_buffers[] = {"exp_avg", ...};
 *   typedef struct {...} NAME_scalars;      per-step float32 scalars
 *   static unsigned NAME_prepare(NAME_scalars *s, const NAME_hparams *hp, int64_t step,
 *                                const fo_grad_opts *o);      -> mode bits (FO_MODE(k))
 *   static unsigned NAME_needs(const NAME_hparams *hp);       -> bit k: buffer k is used
 *   FO_INLINE void NAME_body(FO_BODY_ARGS(NAME)) { for (i < n) ... }
 *   FO_FAMILY(NAME, NMODES)                 NMODES = 2, 4, 8, 16 or 32 (with FO_ZERO_GRAD)
 *
 * The body's buffer arguments s0, s1, s2 are the state buffers in NAME_buffers' order
 * (NULL where unused); `modes` is a compile-time constant in each instantiation.
 */
#define FO_FIELD_MEMBER(type, name) type name;
#define FO_TYPE_double FO_F64
#define FO_TYPE_int32_t FO_I32
/* one family per file, so the file's struct can go by one name for the field table */
#define FO_FIELD_ENTRY(type, name) {#name, offsetof(fo_this_hparams, name), FO_TYPE_##type},
#define FO_HPARAMS(NAME, FIELDS)                                                          \
    typedef struct { FIELDS(FO_FIELD_MEMBER) } NAME##_hparams;                            \
    typedef NAME##_hparams fo_this_hparams;                                               \
    static const fo_field NAME##_fields[] = { FIELDS(FO_FIELD_ENTRY) };

#define FO_BODY_ARGS(NAME)                                                                \
    float *restrict param, float *restrict grad, float *restrict s0, float *restrict s1,  \
    float *restrict s2, size_t n, const NAME##_scalars *s, const unsigned modes

#define FO_CASE_(NAME, m) case m: NAME##_body(param, grad, s0, s1, s2, n, s, m); break;
#define FO_CASES_2(NAME, b) FO_CASE_(NAME, b) FO_CASE_(NAME, b + 1)
#define FO_CASES_4(NAME, b) FO_CASES_2(NAME, b) FO_CASES_2(NAME, b + 2)
#define FO_CASES_8(NAME, b) FO_CASES_4(NAME, b) FO_CASES_4(NAME, b + 4)
#define FO_CASES_16(NAME, b) FO_CASES_8(NAME, b) FO_CASES_8(NAME, b + 8)
#define FO_CASES_32(NAME, b) FO_CASES_16(NAME, b) FO_CASES_16(NAME, b + 16)
#define FO_INST_ARGS(NAME)                                                                \
    float *restrict param, float *restrict grad, float *restrict s0, float *restrict s1,  \
    float *restrict s2, size_t n, const NAME##_scalars *s, unsigned modes
/* modes < NMODES by construction (prepare's bits and FO_ZERO_GRAD) */
#define FO_SELECT_(NAME, NMODES) switch (modes) { FO_CASES_##NMODES(NAME, 0) default: break; }

/* the loop at one ISA with the scalars untyped, for fo_tiles */
#define FO_TILE_FN_(NAME, ISA)                                                            \
    static void NAME##_tile_##ISA(float *param, float *grad, float *s0, float *s1,        \
                                  float *s2, size_t n, const void *s, unsigned modes)     \
    { NAME##_##ISA(param, grad, s0, s1, s2, n, (const NAME##_scalars *)s, modes); }

#if FO_HAVE_X86_64
#define FO_ISA_VARIANTS_(NAME, NMODES)                                                    \
    FO_TARGET_X86_64_V3 static void NAME##_x86_64_v3(FO_INST_ARGS(NAME))                  \
    { FO_SELECT_(NAME, NMODES) }                                                          \
    FO_TARGET_X86_64_V4 static void NAME##_x86_64_v4(FO_INST_ARGS(NAME))                  \
    { FO_SELECT_(NAME, NMODES) }                                                          \
    FO_TILE_FN_(NAME, x86_64_v3) FO_TILE_FN_(NAME, x86_64_v4)
#define FO_TILE_SELECT_(NAME, isa)                                                        \
    ((isa) == FO_ISA_X86_64_V4 ? NAME##_tile_x86_64_v4                                    \
     : (isa) == FO_ISA_X86_64_V3 ? NAME##_tile_x86_64_v3 : NAME##_tile_baseline)
#define FO_ISA_DISPATCH_(NAME, isa, ...)                                                  \
    switch (isa) {                                                                        \
    case FO_ISA_X86_64_V4: NAME##_x86_64_v4(__VA_ARGS__); return;                         \
    case FO_ISA_X86_64_V3: NAME##_x86_64_v3(__VA_ARGS__); return;                         \
    default: NAME##_baseline(__VA_ARGS__); return;                                        \
    }
#else
#define FO_ISA_VARIANTS_(NAME, NMODES)
#define FO_ISA_DISPATCH_(NAME, isa, ...) NAME##_baseline(__VA_ARGS__);
#define FO_TILE_SELECT_(NAME, isa) NAME##_tile_baseline
#endif

#define FO_FAMILY(NAME, NMODES)                                                           \
    static void NAME##_baseline(FO_INST_ARGS(NAME)) { FO_SELECT_(NAME, NMODES) }          \
    FO_TILE_FN_(NAME, baseline)                                                           \
    FO_ISA_VARIANTS_(NAME, NMODES)                                                        \
    static void NAME##_range(const void *call, const void *group, size_t lo, size_t hi)    \
    {                                                                                     \
        const fo_call *c = call;                                                          \
        const fo_group *grp = group;                                                      \
        const NAME##_hparams *hp = grp->hparams;                                          \
        NAME##_scalars s;                                                                 \
        const unsigned modes = NAME##_prepare(&s, hp, grp->step, c->opts)                 \
                               | (c->opts->zero_grad ? FO_ZERO_GRAD : 0u);                \
        const unsigned used = NAME##_needs(hp);                                           \
        if (grp->format != FO_FMT_F32) {                                                  \
            fo_tiles(c, grp, lo, hi, used, FO_TILE_SELECT_(NAME, c->isa), &s, modes);     \
            return;                                                                       \
        }                                                                                 \
        const size_t at = grp->state_start + (lo - grp->start);                           \
        float *b[FO_MAX_BUFFERS];                                                         \
        for (int k = 0; k < FO_MAX_BUFFERS; k++)                                          \
            b[k] = (used >> k & 1u) ? c->state->f32[k] + at : NULL;                       \
        FO_ISA_DISPATCH_(NAME, c->isa, c->param + lo, c->grad + lo, b[0], b[1], b[2],     \
                         hi - lo, &s, modes)                                              \
    }                                                                                     \
    static unsigned NAME##_needs_any(const void *hp) { return NAME##_needs(hp); }         \
    /* the scalars struct is read as float32 words: it must be nothing else */            \
    typedef char NAME##_scalars_are_words[sizeof(NAME##_scalars) % sizeof(float) ? -1 : 1]; \
    static int NAME##_finite(const void *hp, int64_t step, const fo_grad_opts *o)         \
    {                                                                                     \
        NAME##_scalars s;                                                                 \
        memset(&s, 0, sizeof s);                                                          \
        (void)NAME##_prepare(&s, hp, step, o);                                            \
        return fo_words_finite(&s, sizeof s);                                             \
    }                                                                                     \
    const fo_family fo_family_##NAME = {                                                  \
        #NAME, sizeof(NAME##_hparams), NAME##_fields,                                     \
        sizeof NAME##_fields / sizeof NAME##_fields[0], NAME##_buffers,                   \
        sizeof NAME##_buffers / sizeof NAME##_buffers[0], NAME##_needs_any, NAME##_range, \
        NAME##_finite};

/* Whether every 4-byte word of a family's scalars struct is a finite float32.  The structs
 * hold float32 scalars and 0/1 flags (fo_lerp.from_end), whose bit patterns are zero or
 * subnormal, so finite: an infinity or NaN can only be a scalar that overflowed. */
FO_INLINE int fo_words_finite(const void *p, size_t nbytes)
{
    const unsigned char *b = p;
    for (size_t i = 0; i + sizeof(float) <= nbytes; i += sizeof(float)) {
        float x;
        memcpy(&x, b + i, sizeof x);
        if (!isfinite(x))
            return 0;
    }
    return 1;
}

/* Runs fn(ctx, group, lo, hi) over every group's range, split over up to ex->num_threads
 * threads in one parallel region: the groups' elements, taken end to end, are cut into equal
 * chunks of whole 64-byte lines, one chunk a thread, and each cut inside a group moved down to
 * a multiple of `granule` elements from the group's start (int8 state's blocks never
 * straddle two threads).  Each group struct starts with its size_t start and stop; `stride`
 * is the struct's size. */
typedef void (*fo_range_fn)(const void *ctx, const void *group, size_t lo, size_t hi);
void fo_run_groups(const fo_exec *ex, const void *groups, size_t ngroups, size_t stride,
                   size_t granule, fo_range_fn fn, const void *ctx);

#endif /* FASTOPT_INTERNAL_H */
