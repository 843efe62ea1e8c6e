# Declarations of the C core (csrc/fastopt.h); nothing here runs.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

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

    enum: FO_MAX_BUFFERS
    enum: FO_QBLOCK
    enum: FO_CELL_BASE
    enum: FO_NCELLS
    ctypedef enum fo_format:
        FO_FMT_F32
        FO_FMT_BF16
        FO_FMT_BF16_SR
        FO_FMT_INT8

    ctypedef struct fo_group:
        size_t start, stop
        int64_t step
        const void *hparams
        size_t state_start
        uint64_t seed
        int32_t format

    ctypedef struct fo_state:
        float *f32[FO_MAX_BUFFERS]
        uint16_t *bf16[FO_MAX_BUFFERS]
        uint8_t *codes[FO_MAX_BUFFERS]
        float *absmax[FO_MAX_BUFFERS]
        unsigned signed_mask
        uint64_t index_base
        const float *maps
        const uint32_t *cells

    ctypedef enum fo_field_type:
        FO_F64
        FO_I32

    ctypedef struct fo_field:
        const char *name
        size_t offset
        fo_field_type type

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
                 const fo_state *state, const fo_grad_opts *opts, const fo_group *groups,
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
