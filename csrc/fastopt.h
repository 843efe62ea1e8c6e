/*
 * fastopt C core: fused, in-place optimizer updates over contiguous float32 buffers.
 *
 * Plain C, no Python API, no allocation, no global state.  Every family has one entry point
 * that updates a list of groups: each group is a range [start, stop) of the same parallel
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
 * The equations each family implements open its .c file.
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stddef.h>
#include <stdint.h>

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

/* What every family's groups share: a gradient factor and whether to zero the gradient. */
typedef struct {
    /* The gradient is multiplied by this first (clipping or loss-scale coefficient); exactly 1
     * changes no bit of the result. */
    double grad_multiplier;
    /* 1: write 0 into the gradient in the same pass that reads it (saves zero_grad's pass). */
    int zero_grad;
} fo_grad_opts;

typedef struct {
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize;
    /* 1 on the step that creates the momentum buffer: it is set to the gradient, undamped. */
    int first_step;
} fo_sgd_hparams;

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;          /* 1-based count of the step being taken */
    int decoupled;         /* 1: AdamW's decoupled weight decay; 0: Adam's L2 term in the gradient */
    int amsgrad, maximize;
} fo_adam_hparams;

typedef struct {
    double lr, alpha, eps, weight_decay, momentum;
    int centered, maximize;
} fo_rmsprop_hparams;

/* Groups: a range of the buffers and its hyperparameters.  Ranges must not overlap. */
typedef struct { size_t start, stop; fo_grad_opts g; fo_sgd_hparams hp; } fo_sgd_group;
typedef struct { size_t start, stop; fo_grad_opts g; fo_adam_hparams hp; } fo_adam_group;
typedef struct { size_t start, stop; fo_grad_opts g; fo_rmsprop_hparams hp; } fo_rmsprop_group;

/* momentum_buffer may be NULL when no group has momentum != 0. */
void fo_sgd(const fo_exec *ex, float *restrict param, float *restrict grad,
            float *restrict momentum_buffer, const fo_sgd_group *groups, size_t ngroups);

/* max_exp_avg_sq may be NULL when no group has amsgrad. */
void fo_adam(const fo_exec *ex, float *restrict param, float *restrict grad,
             float *restrict exp_avg, float *restrict exp_avg_sq,
             float *restrict max_exp_avg_sq, const fo_adam_group *groups, size_t ngroups);

/* momentum_buffer may be NULL when no group has momentum > 0; grad_avg when none is centered. */
void fo_rmsprop(const fo_exec *ex, float *restrict param, float *restrict grad,
                float *restrict square_avg, float *restrict momentum_buffer,
                float *restrict grad_avg, const fo_rmsprop_group *groups, size_t ngroups);

/* The norm_type-norm of grad (2, 1, INFINITY or any p > 0), accumulated in double and
 * deterministic whatever the threads or ISA; *nonfinite is set to 1 if any element is NaN or
 * infinite.  block_sums: scratch of fo_norm_blocks(n) doubles. */
#define FO_NORM_BLOCK 8192
size_t fo_norm_blocks(size_t n);
double fo_grad_norm(const fo_exec *ex, const float *restrict grad, size_t n, double norm_type,
                    double *restrict block_sums, int *nonfinite);

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
