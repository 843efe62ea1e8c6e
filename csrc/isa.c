/* Which instruction-set paths this build has, and which this CPU runs. */
#include "isa.h"

int fo_isa_supported(fo_isa isa)
{
    switch (isa) {
    case FO_ISA_BASELINE:
        return 1;
    case FO_ISA_X86_64_V3:
#if FO_HAVE_X86_64_V3
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        return 0;
#endif
    }
    return 0;
}

fo_isa fo_best_isa(void)
{
    return fo_isa_supported(FO_ISA_X86_64_V3) ? FO_ISA_X86_64_V3 : FO_ISA_BASELINE;
}

const char *fo_isa_name(fo_isa isa)
{
    switch (isa) {
    case FO_ISA_BASELINE:
        return "baseline";
    case FO_ISA_X86_64_V3:
        return "x86-64-v3 (AVX2+FMA)";
    }
    return "unknown";
}
