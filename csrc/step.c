/* The families this build has, and the one entry point that steps any of them.
 *
 * setup.py defines FO_FAMILY_LIST as X(name) for each file csrc/families/NAME.c, so adding a
 * family is adding its file. */
#include <string.h>

#include "internal.h"

#ifndef FO_FAMILY_LIST
#error "FO_FAMILY_LIST must list the families (setup.py defines it from csrc/families/)"
#endif

#define X(name) extern const fo_family fo_family_##name;
FO_FAMILY_LIST
#undef X

#define X(name) &fo_family_##name,
static const fo_family *const families[] = {FO_FAMILY_LIST};
#undef X

size_t fo_family_count(void)
{
    return sizeof families / sizeof families[0];
}

const fo_family *fo_family_at(size_t i)
{
    return i < fo_family_count() ? families[i] : NULL;
}

const fo_family *fo_family_find(const char *name)
{
    for (size_t i = 0; i < fo_family_count(); i++)
        if (strcmp(families[i]->name, name) == 0)
            return families[i];
    return NULL;
}

size_t fo_check(const fo_family *family, const fo_grad_opts *opts, const fo_group *groups,
                size_t ngroups)
{
    for (size_t i = 0; i < ngroups; i++)
        if (!family->finite(groups[i].hparams, groups[i].step, opts))
            return i + 1;
    return 0;
}

void fo_step(const fo_family *family, const fo_exec *ex, float *param, float *grad,
             const fo_state *state, const fo_grad_opts *opts, const fo_group *groups,
             size_t ngroups)
{
    const fo_call c = {ex->isa, param, grad, state, opts};
    fo_run_groups(ex, groups, ngroups, sizeof *groups, FO_QBLOCK, family->range, &c);
}
