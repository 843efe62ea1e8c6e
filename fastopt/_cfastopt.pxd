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

    ctypedef struct fo_group:
        size_t start, stop
        int64_t step
        const void *hparams

    ctypedef enum fo_field_type:
        FO_F64
        FO_I32

    ctypedef struct fo_field:
        const char *name
        size_t offset
        fo_field_type type

    enum: FO_MAX_BUFFERS

    ctypedef struct fo_family:
        const char *name
        size_t hparams_size
        const fo_field *fields
        size_t nfields
        const char *const *buffers
        size_t nbuffers
        unsigned (*needs)(const void *hparams)

    size_t fo_family_count()
    const fo_family *fo_family_at(size_t i)
    const fo_family *fo_family_find(const char *name)
    void fo_step(const fo_family *family, const fo_exec *ex, float *param, float *grad,
                 float *const *state, const fo_grad_opts *opts, const fo_group *groups,
                 size_t ngroups)
    size_t fo_check(const fo_family *family, const fo_grad_opts *opts, const fo_group *groups,
                    size_t ngroups)

    enum: FO_NORM_BLOCK
    size_t fo_norm_blocks(size_t n)
    void fo_norm_block_sums(const fo_exec *ex, const float *grad, size_t n, double norm_type,
                            double *block_sums, int *nonfinite)
    double fo_norm_combine(const double *block_sums, size_t nblocks, double norm_type)
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
