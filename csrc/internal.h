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

/* How a family's loop reads and writes its state, chosen per instantiation (`fmt` is a
 * constant in each, so the tests cost nothing): float32, or bfloat16 bits widened on load and
 * rounded on store in registers, as one pass over the arena (csrc/formats.c and
 * fastopt/_formats.py state the rules; the tests hold these to the NumPy twins bit for bit).
 * int8 state goes through float32 tiles instead (fo_range), and the loop sees FO_FMT_F32. */
typedef struct {
    uint32_t key[FO_MAX_BUFFERS];   /* FO_FMT_BF16_SR: each buffer's random stream */
    uint32_t index;                 /* the low 32 bits of element 0's arena index */
} fo_stream;

FO_INLINE uint32_t fo_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

FO_INLINE float fo_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* lowbias32 (Chris Wellons' 32-bit integer hash) >> 16: its last step (x ^= x >> 16) leaves the
 * high 16 bits as they are, so it is skipped */
FO_INLINE uint32_t fo_mix32_high16(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    return x >> 16;
}

FO_INLINE float fo_state_get(const void *restrict s, size_t i, int fmt)
{
    if (fmt == FO_FMT_BF16 || fmt == FO_FMT_BF16_SR)
        return fo_float((uint32_t)((const uint16_t *)s)[i] << 16);
    return ((const float *)s)[i];
}

/* bfloat16: (u + inc) >> 16, inc = 0x7fff + the kept lsb (nearest, ties to even) or the high
 * 16 bits of a hash of (key, index) (stochastic); a NaN keeps its high half with the quiet bit
 * set ((u | 0x400000) >> 16).  Written for GCC's vectorizer: the NaN test as a float compare,
 * and the high half taken by an arithmetic shift (the same low 16 bits as a logical one), with
 * which GCC chose a shorter narrowing: on a copy of Adam's loop with bfloat16 state, in cache,
 * 1.06 -> 0.70 ns an element, against 0.46 for float32 state. */
FO_INLINE void fo_state_put(void *restrict s, size_t i, float x, int fmt, uint32_t key,
                            uint32_t index)
{
    if (fmt != FO_FMT_BF16 && fmt != FO_FMT_BF16_SR) {
        ((float *)s)[i] = x;
        return;
    }
    const uint32_t u = fo_bits(x);
    const uint32_t inc = fmt == FO_FMT_BF16 ? 0x7fffU + (u >> 16 & 1U)
                                            : fo_mix32_high16(key ^ (index + (uint32_t)i));
    const uint32_t r = x != x ? u | 0x400000U : u + inc;
#if FO_GNU
    ((uint16_t *)s)[i] = (uint16_t)((int32_t)r >> 16);   /* GCC: modulo, arithmetic shift */
#else
    ((uint16_t *)s)[i] = (uint16_t)(r >> 16);
#endif
}

/* In a family's body: state buffer k's element i, read and written in the body's format. */
#define FO_GET(k, i) fo_state_get(s##k, (i), fmt)
#define FO_PUT(k, i, x) fo_state_put(s##k, (i), (x), fmt, sr.key[k], sr.index)

/* A family's loop at one ISA, with its scalars untyped: what fo_range calls. */
typedef void (*fo_body_fn)(float *param, float *grad, void *s0, void *s1, void *s2, size_t n,
                           const void *scalars, unsigned modes, int fmt, fo_stream sr);

/* Group `g`'s range [lo, hi), whatever its state format: float32 and bfloat16 by `body` over
 * the arenas (a stochastic range cut where the arena index crosses a multiple of 2^32, each
 * part with its own keys); int8 tile by tile (FO_QBLOCK elements), the used buffers widened
 * into float32 tiles, `body` run on them, and the tiles rounded back, in one pass. */
void fo_range(const fo_call *c, const fo_group *g, size_t lo, size_t hi, unsigned used,
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
 * (NULL where unused), read as FO_GET(k, i) and written as FO_PUT(k, i, x) (the body computes
 * with float32 values; only what it stores takes the state's format); `modes` and `fmt` are
 * compile-time constants in each instantiation.
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
    float *restrict param, float *restrict grad, void *restrict s0, void *restrict s1,    \
    void *restrict s2, size_t n, const NAME##_scalars *s, const unsigned modes,           \
    const int fmt, const fo_stream sr

#define FO_CASE_(NAME, f, m)                                                              \
    case m: NAME##_body(param, grad, s0, s1, s2, n, s, m, f, sr); break;
#define FO_CASES_2(NAME, f, b) FO_CASE_(NAME, f, b) FO_CASE_(NAME, f, b + 1)
#define FO_CASES_4(NAME, f, b) FO_CASES_2(NAME, f, b) FO_CASES_2(NAME, f, b + 2)
#define FO_CASES_8(NAME, f, b) FO_CASES_4(NAME, f, b) FO_CASES_4(NAME, f, b + 4)
#define FO_CASES_16(NAME, f, b) FO_CASES_8(NAME, f, b) FO_CASES_8(NAME, f, b + 8)
#define FO_CASES_32(NAME, f, b) FO_CASES_16(NAME, f, b) FO_CASES_16(NAME, f, b + 16)
#define FO_INST_ARGS                                                                      \
    float *restrict param, float *restrict grad, void *restrict s0, void *restrict s1,    \
    void *restrict s2, size_t n, const void *scalars, unsigned modes, int fmt, fo_stream sr
/* modes < NMODES by construction (prepare's bits and FO_ZERO_GRAD); int8 tiles come as
 * float32 */
#define FO_MODES_(NAME, NMODES, f)                                                        \
    switch (modes) { FO_CASES_##NMODES(NAME, f, 0) default: break; }
#define FO_SELECT_(NAME, NMODES)                                                          \
    const NAME##_scalars *s = scalars;                                                    \
    switch (fmt) {                                                                        \
    case FO_FMT_BF16: FO_MODES_(NAME, NMODES, FO_FMT_BF16) break;                         \
    case FO_FMT_BF16_SR: FO_MODES_(NAME, NMODES, FO_FMT_BF16_SR) break;                   \
    default: FO_MODES_(NAME, NMODES, FO_FMT_F32) break;                                   \
    }

#if FO_HAVE_X86_64
#define FO_ISA_VARIANTS_(NAME, NMODES)                                                    \
    FO_TARGET_X86_64_V3 static void NAME##_x86_64_v3(FO_INST_ARGS)                        \
    { FO_SELECT_(NAME, NMODES) }                                                          \
    FO_TARGET_X86_64_V4 static void NAME##_x86_64_v4(FO_INST_ARGS)                        \
    { FO_SELECT_(NAME, NMODES) }
#define FO_ISA_SELECT_(NAME, isa)                                                         \
    ((isa) == FO_ISA_X86_64_V4 ? NAME##_x86_64_v4                                         \
     : (isa) == FO_ISA_X86_64_V3 ? NAME##_x86_64_v3 : NAME##_baseline)
#else
#define FO_ISA_VARIANTS_(NAME, NMODES)
#define FO_ISA_SELECT_(NAME, isa) NAME##_baseline
#endif

#define FO_FAMILY(NAME, NMODES)                                                           \
    static void NAME##_baseline(FO_INST_ARGS) { FO_SELECT_(NAME, NMODES) }                \
    FO_ISA_VARIANTS_(NAME, NMODES)                                                        \
    static void NAME##_range(const void *call, const void *group, size_t lo, size_t hi)    \
    {                                                                                     \
        const fo_call *c = call;                                                          \
        const fo_group *grp = group;                                                      \
        const NAME##_hparams *hp = grp->hparams;                                          \
        NAME##_scalars s;                                                                 \
        const unsigned modes = NAME##_prepare(&s, hp, grp->step, c->opts)                 \
                               | (c->opts->zero_grad ? FO_ZERO_GRAD : 0u);                \
        fo_range(c, grp, lo, hi, NAME##_needs(hp), FO_ISA_SELECT_(NAME, c->isa), &s,      \
                 modes);                                                                  \
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
