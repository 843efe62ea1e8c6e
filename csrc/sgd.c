/*
 * SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD, fused=True
 * semantics), one pass per step.  Scalars are rounded to float32 once (f); fma = one rounding.
 *
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:      grad = 0                              (after it is read, same pass)
 *   weight decay:   g = fma(p, f(wd), g)                  (only when wd != 0)
 *   momentum > 0:   first step  buf = g                   (no dampening, as torch)
 *                   later       buf = fma(g, f(1-dampening), buf*f(momentum))
 *                   Nesterov    g = fma(buf, f(momentum), g)      (with the new buf)
 *                   otherwise   g = buf
 *   p = fma(g, f(-lr), p)
 *
 * torch's scalar tail (the last numel % 8 of each tensor) groups the later-step momentum
 * update as fma(buf, f(momentum), g*f(1-dampening)); we use the vector formula everywhere.
 */
#include "internal.h"

#include <math.h>

typedef struct {
    float grad_factor, neg_lr, weight_decay, momentum, one_minus_dampening;
    unsigned modes;
} sgd_scalars;

/* SGD_FIRST and SGD_LATER: the momentum buffer's two updates (neither: no momentum). */
enum { SGD_FIRST = 1, SGD_LATER = 2, SGD_NESTEROV = 4, SGD_L2 = 8, SGD_ZERO_GRAD = 16 };

static void sgd_prepare(sgd_scalars *s, const fo_sgd_group *grp)
{
    const fo_sgd_hparams *hp = &grp->hp;
    s->grad_factor = fo_grad_factor(&grp->g, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->momentum = fo_f32(hp->momentum);
    s->one_minus_dampening = fo_f32(1.0 - hp->dampening);
    s->modes = (hp->momentum == 0.0 ? 0u : hp->first_step ? SGD_FIRST : SGD_LATER)
             | (hp->momentum != 0.0 && hp->nesterov ? SGD_NESTEROV : 0u)
             | (hp->weight_decay != 0.0 ? SGD_L2 : 0u)
             | (grp->g.zero_grad ? SGD_ZERO_GRAD : 0u);
}

FO_INLINE void sgd_body(float *restrict param, float *restrict grad, float *restrict buf,
                        size_t n, const sgd_scalars *s, const unsigned modes)
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr;
    const float weight_decay = s->weight_decay, momentum = s->momentum;
    const float one_minus_dampening = s->one_minus_dampening;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = grad[i] * grad_factor;
        if (modes & SGD_ZERO_GRAD)
            grad[i] = 0.0f;
        if (modes & SGD_L2)
            g = fmaf(p, weight_decay, g);
        if (modes & (SGD_FIRST | SGD_LATER)) {
            const float b = (modes & SGD_FIRST) ? g
                            : fmaf(g, one_minus_dampening, buf[i] * momentum);
            buf[i] = b;
            g = (modes & SGD_NESTEROV) ? fmaf(b, momentum, g) : b;
        }
        param[i] = fmaf(g, neg_lr, p);
    }
}

#define SGD_CASE(m) case m: sgd_body(param, grad, buf, n, s, m); break;
#define SGD_CASES_8(b) SGD_CASE(b) SGD_CASE(b + 1) SGD_CASE(b + 2) SGD_CASE(b + 3) \
                       SGD_CASE(b + 4) SGD_CASE(b + 5) SGD_CASE(b + 6) SGD_CASE(b + 7)
/* One instantiation per combination of modes (some are never asked for: harmless). */
#define SGD_SELECT switch (s->modes) { SGD_CASES_8(0) SGD_CASES_8(8) SGD_CASES_8(16) \
                                       SGD_CASES_8(24) default: break; }
#define SGD_ARGS float *restrict param, float *restrict grad, float *restrict buf, size_t n, \
                 const sgd_scalars *s

static void sgd_baseline(SGD_ARGS) { SGD_SELECT }
#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3 static void sgd_x86_64_v3(SGD_ARGS) { SGD_SELECT }
FO_TARGET_X86_64_V4 static void sgd_x86_64_v4(SGD_ARGS) { SGD_SELECT }
#endif

typedef struct {
    fo_isa isa;
    float *param, *grad, *momentum_buffer;
} sgd_ctx;

static void sgd_range(const void *ctx, const void *group, size_t lo, size_t hi)
{
    const sgd_ctx *c = ctx;
    sgd_scalars s;
    sgd_prepare(&s, group);
    float *buf = (s.modes & (SGD_FIRST | SGD_LATER)) ? c->momentum_buffer + lo : NULL;
    switch (c->isa) {
#if FO_HAVE_X86_64
    case FO_ISA_X86_64_V4:
        sgd_x86_64_v4(c->param + lo, c->grad + lo, buf, hi - lo, &s);
        return;
    case FO_ISA_X86_64_V3:
        sgd_x86_64_v3(c->param + lo, c->grad + lo, buf, hi - lo, &s);
        return;
#endif
    default:
        sgd_baseline(c->param + lo, c->grad + lo, buf, hi - lo, &s);
    }
}

void fo_sgd(const fo_exec *ex, float *restrict param, float *restrict grad,
            float *restrict momentum_buffer, const fo_sgd_group *groups, size_t ngroups)
{
    const sgd_ctx c = {ex->isa, param, grad, momentum_buffer};
    fo_run_groups(ex, groups, ngroups, sizeof *groups, sgd_range, &c);
}
