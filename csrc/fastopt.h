/*
 * fastopt C core: fused, in-place optimizer updates over contiguous float32 buffers.
 *
 * Plain C, no Python API, no allocation, no global state.  Every entry point takes the
 * instruction-set path to run (chosen once by the caller, see fo_best_isa), `float *restrict`
 * buffers of n elements that must not overlap, and a struct of hyperparameters in double.
 * Per-step scalars are derived from the struct once, at the top of each entry point, in double
 * and rounded to float32 once, exactly as torch's fused CPU kernels do; the loops then use
 * explicit fmaf() where torch fuses, and the build uses -ffp-contract=off so the compiler adds
 * no fused multiply-add of its own.  Results are bitwise identical on every ISA path.
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
    FO_ISA_X86_64_V3 = 1,  /* AVX2 + FMA (x86-64-v3) */
} fo_isa;

/* The fastest path this CPU runs (the caller may still choose FO_ISA_BASELINE). */
fo_isa fo_best_isa(void);
/* 1 when this build has code for `isa` and this CPU can run it. */
int fo_isa_supported(fo_isa isa);
const char *fo_isa_name(fo_isa isa);

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

/* momentum_buffer may be NULL when hp->momentum == 0. */
void fo_sgd(fo_isa isa, float *restrict param, const float *restrict grad,
            float *restrict momentum_buffer, size_t n, const fo_sgd_hparams *hp);

/* max_exp_avg_sq may be NULL unless hp->amsgrad. */
void fo_adam(fo_isa isa, float *restrict param, const float *restrict grad,
             float *restrict exp_avg, float *restrict exp_avg_sq,
             float *restrict max_exp_avg_sq, size_t n, const fo_adam_hparams *hp);

/* momentum_buffer may be NULL unless hp->momentum > 0; grad_avg may be NULL unless hp->centered. */
void fo_rmsprop(fo_isa isa, float *restrict param, const float *restrict grad,
                float *restrict square_avg, float *restrict momentum_buffer,
                float *restrict grad_avg, size_t n, const fo_rmsprop_hparams *hp);

#ifdef __cplusplus
}
#endif

#endif /* FASTOPT_H */
