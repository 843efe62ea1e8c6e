# Declarations of the C core (csrc/fastopt.h); nothing here runs.
from libc.stdint cimport int64_t

cdef extern from "fastopt.h" nogil:
    ctypedef enum fo_isa:
        FO_ISA_BASELINE
        FO_ISA_X86_64_V3
        FO_ISA_X86_64_V4

    fo_isa fo_best_isa()
    int fo_isa_supported(fo_isa isa)
    const char *fo_isa_name(fo_isa isa)
    int fo_have_openmp()
    const char *fo_compiler()
    const char *fo_compile_flags()

    ctypedef struct fo_exec:
        fo_isa isa
        int num_threads
        size_t min_per_thread

    ctypedef struct fo_grad_opts:
        double grad_multiplier
        int zero_grad

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

    ctypedef struct fo_sgd_group:
        size_t start, stop
        fo_grad_opts g
        fo_sgd_hparams hp

    ctypedef struct fo_adam_group:
        size_t start, stop
        fo_grad_opts g
        fo_adam_hparams hp

    ctypedef struct fo_rmsprop_group:
        size_t start, stop
        fo_grad_opts g
        fo_rmsprop_hparams hp

    void fo_sgd(const fo_exec *ex, float *param, float *grad, float *momentum_buffer,
                const fo_sgd_group *groups, size_t ngroups)
    void fo_adam(const fo_exec *ex, float *param, float *grad, float *exp_avg,
                 float *exp_avg_sq, float *max_exp_avg_sq, const fo_adam_group *groups,
                 size_t ngroups)
    void fo_rmsprop(const fo_exec *ex, float *param, float *grad, float *square_avg,
                    float *momentum_buffer, float *grad_avg, const fo_rmsprop_group *groups,
                    size_t ngroups)
    size_t fo_norm_blocks(size_t n)
    double fo_grad_norm(const fo_exec *ex, const float *grad, size_t n, double norm_type,
                        double *block_sums, int *nonfinite)
    void fo_probe_r4w3(const fo_exec *ex, float *a, const float *b, float *c, float *d, size_t n)
    void fo_probe_r3w2(const fo_exec *ex, float *a, const float *b, float *c, size_t n)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fo_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fo_omp_max_threads(void) { return 1; }
    #endif
    """
    int fo_omp_max_threads() nogil
