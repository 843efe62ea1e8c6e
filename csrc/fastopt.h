/*
 * fastopt C core: fused, in-place optimizer updates over contiguous float32 buffers.
 *
 * Plain C, no Python API, no allocation, no global state.  One entry point, fo_step, updates
 * a list of groups for any family: each group is a range [start, stop) of the same parallel
 * buffers (params, grads, state) with its own hyperparameters, which is how an optimizer's
 * arena is laid out; a single call updates the whole arena, in one parallel region when
 * threads are asked for.  The buffers must not overlap and must hold every range.
 *
 * Per-step scalars are derived from each group's hyperparameters (given in double) once, in
 * double, and rounded to float32 once, exactly as torch's fused CPU kernels do; the loops then
 * use explicit fmaf() where torch fuses, and the build uses -ffp-contract=off so the compiler
 * adds no fused multiply-add of its own.  Results are bitwise identical on every ISA path and
 * every thread count.
 *
 * The equations each family implements open its file in csrc/families/.
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stddef.h>
#include <stdint.h>

/* MSVC's C compiler spells C99's restrict __restrict before /std:c11 */
#if defined(_MSC_VER) && !defined(__cplusplus) && !defined(restrict)
#define restrict __restrict
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FO_ISA_BASELINE = 0,   /* the compiler's default target: SSE2 on x86-64, NEON on aarch64 */
    FO_ISA_X86_64_V3 = 1,  /* AVX2 + FMA */
    FO_ISA_X86_64_V4 = 2,  /* AVX-512 (F, BW, DQ, VL) */
} fo_isa;

/* The fastest path this CPU runs (the caller may still choose a slower one). */
fo_isa fo_best_isa(void);
/* 1 when this build has code for `isa` and this CPU can run it. */
int fo_isa_supported(fo_isa isa);
const char *fo_isa_name(fo_isa isa);

/* How to run a call: the ISA path and the threads. */
typedef struct {
    fo_isa isa;
    int num_threads;         /* at most this many threads; <= 1 runs on the calling thread */
    size_t min_per_thread;   /* fewer threads run when each would get fewer elements */
} fo_exec;

/* 1 when built with OpenMP (otherwise every call runs on the calling thread). */
int fo_have_openmp(void);
/* The compiler and the flags this file was built with. */
const char *fo_compiler(void);
const char *fo_compile_flags(void);

/* What every group of one call shares: a gradient factor and whether to zero the gradient. */
typedef struct {
    /* The gradient is multiplied by this first (clipping or loss-scale coefficient); exactly 1
     * changes no bit of the result. */
    double grad_multiplier;
    /* 1: write 0 into the gradient in the same pass that reads it (saves zero_grad's pass). */
    int zero_grad;
} fo_grad_opts;

#define FO_MAX_BUFFERS 3

/* How a group's state buffers are stored (fastopt/_formats.py states the rules and holds the
 * NumPy twins): float32; bfloat16 rounded to nearest even or stochastically; or int8 codes of
 * a 256-entry dynamic map with a float32 absmax per block of FO_QBLOCK elements. */
typedef enum {
    FO_FMT_F32 = 0,
    FO_FMT_BF16 = 1,
    FO_FMT_BF16_SR = 2,
    FO_FMT_INT8 = 3,
} fo_format;

#define FO_QBLOCK 256
/* The int8 code lookup (see _formats.py): cells of |x/absmax| by the top 16 bits of its float32
 * pattern, from 2^-27 (FO_CELL_BASE) up to [1, 2). */
#define FO_CELL_BASE ((127 - 27) << 7)
#define FO_NCELLS (28 << 7)

/* One group of a call: a range [start, stop) of the parallel buffers, the 1-based count of
 * the step being taken (the caller owns the count; C never changes it), the family's
 * hyperparameters (a struct of the family's: its fields are listed in fo_family.fields), and
 * how its state is stored: in the arenas of its format, from element state_start (a group's
 * element start + j is state element state_start + j).  An int8 group has start, stop and
 * state_start on FO_QBLOCK boundaries of its own (stop - start and state_start multiples of
 * it); a call may take any part of it that starts and stops on those. */
typedef struct {
    size_t start, stop;
    int64_t step;
    const void *hparams;
    size_t state_start;
    uint64_t seed;          /* FO_FMT_BF16_SR: the random stream's seed */
    int32_t format;         /* fo_format */
} fo_group;

/* The state arenas of a call, per format, each holding its groups' ranges one after another
 * (slot k: the family's buffer k; NULL where no group needs it), and what the formats read. */
typedef struct {
    float *f32[FO_MAX_BUFFERS];
    uint16_t *bf16[FO_MAX_BUFFERS];
    uint8_t *codes[FO_MAX_BUFFERS];
    float *absmax[FO_MAX_BUFFERS];         /* one per FO_QBLOCK codes */
    unsigned signed_mask;                  /* bit k: buffer k takes both signs */
    uint64_t index_base;                   /* the arena index of element 0 (a shard's start) */
    const float *maps;                     /* [2][256]: the unsigned map, the signed map */
    const uint32_t *cells;                 /* [2][FO_NCELLS]: their code lookups */
} fo_state;

/* One field of a family's hyperparameter struct, so that a caller can lay out the struct by
 * name (the Python side builds a NumPy structured dtype and checks it against this). */
typedef enum { FO_F64 = 0, FO_I32 = 1 } fo_field_type;
typedef struct {
    const char *name;
    size_t offset;
    fo_field_type type;
} fo_field;

/* An optimizer family: its name, hyperparameter struct, state buffers and kernel. */
typedef struct fo_family {
    const char *name;
    size_t hparams_size;
    const fo_field *fields;
    size_t nfields;
    const char *const *buffers;    /* the state buffers' names, in the order fo_step takes them */
    size_t nbuffers;
    /* Bit k set: state buffer k is read or written by a group with these hyperparameters. */
    unsigned (*needs)(const void *hparams);
    /* internal: one group's range [lo, hi) */
    void (*range)(const void *call, const void *group, size_t lo, size_t hi);
    /* internal: whether the per-step float32 scalars of these hyperparameters are finite */
    int (*finite)(const void *hparams, int64_t step, const fo_grad_opts *opts);
} fo_family;

/* The families this build has (the files in csrc/families/), and one by name (NULL if none). */
size_t fo_family_count(void);
const fo_family *fo_family_at(size_t i);
const fo_family *fo_family_find(const char *name);

/* One step of every group, in one parallel region.  `state` holds the family's state arenas
 * (fo_state); a buffer may be NULL when no group of its format needs it (fo_family.needs). */
void fo_step(const fo_family *family, const fo_exec *ex, float *param, float *grad,
             const fo_state *state, const fo_grad_opts *opts, const fo_group *groups,
             size_t ngroups);

/* 0 when every group's per-step float32 scalars (step sizes, decay factors, bias corrections,
 * the gradient factor: what each family computes once per step in double and rounds) are
 * finite; else 1 + the index of the first group whose scalars overflow float32 (lr / (1 -
 * beta1^t) past 3.4e38, say).  fo_step would write infinities or NaNs for such a group: check
 * first. */
size_t fo_check(const fo_family *family, const fo_grad_opts *opts, const fo_group *groups,
                size_t ngroups);

/* The norm_type-norm of grad (2, 1, INFINITY or any p > 0), accumulated in double and
 * deterministic whatever the threads or ISA; *nonfinite is set to 1 if any element is NaN or
 * infinite.  block_sums: scratch of fo_norm_blocks(n) doubles. */
#define FO_NORM_BLOCK 8192
size_t fo_norm_blocks(size_t n);
double fo_grad_norm(const fo_exec *ex, const float *restrict grad, size_t n, double norm_type,
                    double *restrict block_sums, int *nonfinite);
/* fo_grad_norm in two halves, for a buffer cut into shards on FO_NORM_BLOCK boundaries (ZeRO):
 * each shard's block sums (the same numbers fo_grad_norm computes for those blocks), then the
 * norm from every block's sum in order, bit-identical to fo_grad_norm over the whole buffer. */
void fo_norm_block_sums(const fo_exec *ex, const float *restrict grad, size_t n,
                        double norm_type, double *restrict block_sums, int *nonfinite);
double fo_norm_combine(const double *block_sums, size_t nblocks, double norm_type);

/* Memory-bandwidth probes with an optimizer's traffic and trivial arithmetic, threaded like
 * the kernels: r4w3 reads a, b, c, d and writes a, c, d (Adam's pattern); r3w2 reads a, b, c
 * and writes a, c (SGD with momentum, RMSprop). */
void fo_probe_r4w3(const fo_exec *ex, float *restrict a, const float *restrict b,
                   float *restrict c, float *restrict d, size_t n);
void fo_probe_r3w2(const fo_exec *ex, float *restrict a, const float *restrict b,
                   float *restrict c, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* FASTOPT_H */
