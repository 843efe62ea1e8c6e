# Declarations of the C core (csrc/fastopt.h); nothing here runs.
from libc.stdint cimport int64_t

cdef extern from "fastopt.h" nogil:
    ctypedef enum fo_isa:
        FO_ISA_BASELINE
        FO_ISA_X86_64_V3

    fo_isa fo_best_isa()
    int fo_isa_supported(fo_isa isa)
    const char *fo_isa_name(fo_isa isa)

    ctypedef struct fo_sgd_hparams:
        double lr, momentum, dampening, weight_decay
        int nesterov, maximize, first_step

    ctypedef struct fo_adam_hparams:
        double lr, beta1, beta2, eps, weight_decay
        int64_t step
        int decoupled, amsgrad, maximize

    ctypedef struct fo_rmsprop_hparams:
        double lr, alpha, eps, weight_decay, momentum
        int centered, maximize

    void fo_sgd(fo_isa isa, float *param, const float *grad, float *momentum_buffer,
                size_t n, const fo_sgd_hparams *hp)
    void fo_adam(fo_isa isa, float *param, const float *grad, float *exp_avg,
                 float *exp_avg_sq, float *max_exp_avg_sq, size_t n, const fo_adam_hparams *hp)
    void fo_rmsprop(fo_isa isa, float *param, const float *grad, float *square_avg,
                    float *momentum_buffer, float *grad_avg, size_t n,
                    const fo_rmsprop_hparams *hp)
