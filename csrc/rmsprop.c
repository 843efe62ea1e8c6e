/*
 * RMSprop, plain and centered, with momentum and weight decay (torch.optim.RMSprop), one pass
 * per step.  Scalars are rounded to float32 once (f); fma = one rounding.
 *
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:      grad = 0                              (after it is read, same pass)
 *   weight decay:   g = fma(p, f(wd), g)                  (only when wd != 0)
 *   sa = fma(f(1-alpha)*g, g, sa*f(alpha))
 *   centered:       ga = lerp(ga, g, f(1-alpha))          (torch's lerp, as in adam.c)
 *                   avg = sqrt(fma(-ga, ga, sa))
 *   otherwise       avg = sqrt(sa)
 *   avg = avg + f(eps)
 *   momentum > 0:   buf = buf*f(momentum) + g/avg;   p = fma(buf, f(-lr), p)
 *   otherwise       p = p + (f(-lr)*g) / avg
 *
 * torch has no fused RMSprop; its for-each loop computes sqrt with a vectorized approximation
 * that is not correctly rounded, so torch and this kernel agree to a few ulp, not bitwise.
 */
#include <math.h>

#include "internal.h"

typedef struct {
    float grad_factor, neg_lr, weight_decay, alpha, one_minus_alpha, eps, momentum;
    float lerp_coeff;
    int lerp_from_grad;
    unsigned modes;
} rmsprop_scalars;

enum { RMS_CENTERED = 1, RMS_MOMENTUM = 2, RMS_L2 = 4, RMS_ZERO_GRAD = 8 };

static void rmsprop_prepare(rmsprop_scalars *s, const fo_rmsprop_group *grp)
{
    const fo_rmsprop_hparams *hp = &grp->hp;
    s->grad_factor = fo_grad_factor(&grp->g, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->alpha = fo_f32(hp->alpha);
    s->one_minus_alpha = fo_f32(1.0 - hp->alpha);
    s->eps = fo_f32(hp->eps);
    s->momentum = fo_f32(hp->momentum);
    s->lerp_from_grad = !(fabsf(s->one_minus_alpha) < 0.5f);
    s->lerp_coeff = s->lerp_from_grad ? s->one_minus_alpha - 1.0f : s->one_minus_alpha;
    s->modes = (hp->centered ? RMS_CENTERED : 0u) | (hp->momentum > 0.0 ? RMS_MOMENTUM : 0u)
             | (hp->weight_decay != 0.0 ? RMS_L2 : 0u)
             | (grp->g.zero_grad ? RMS_ZERO_GRAD : 0u);
}

FO_INLINE void rmsprop_body(float *restrict param, float *restrict grad,
                            float *restrict square_avg, float *restrict buf,
                            float *restrict grad_avg, size_t n, const rmsprop_scalars *s,
                            const unsigned modes)
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr;
    const float weight_decay = s->weight_decay, alpha = s->alpha;
    const float one_minus_alpha = s->one_minus_alpha, eps = s->eps, momentum = s->momentum;
    const float lerp_coeff = s->lerp_coeff;
    const int lerp_from_grad = s->lerp_from_grad;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = grad[i] * grad_factor;
        if (modes & RMS_ZERO_GRAD)
            grad[i] = 0.0f;
        if (modes & RMS_L2)
            g = fmaf(p, weight_decay, g);
        const float sa = fmaf(one_minus_alpha * g, g, square_avg[i] * alpha);
        square_avg[i] = sa;
        float avg;
        if (modes & RMS_CENTERED) {
            const float ga_old = grad_avg[i];
            const float ga = fmaf(lerp_coeff, g - ga_old, lerp_from_grad ? g : ga_old);
            grad_avg[i] = ga;
            avg = sqrtf(fmaf(-ga, ga, sa));
        } else {
            avg = sqrtf(sa);
        }
        avg = avg + eps;
        if (modes & RMS_MOMENTUM) {
            const float b = buf[i] * momentum + g / avg;
            buf[i] = b;
            param[i] = fmaf(b, neg_lr, p);
        } else {
            param[i] = p + (neg_lr * g) / avg;
        }
    }
}

#define RMS_CASE(m) case m: rmsprop_body(param, grad, square_avg, buf, grad_avg, n, s, m); break;
#define RMS_SELECT switch (s->modes) {                                                       \
    RMS_CASE(0) RMS_CASE(1) RMS_CASE(2) RMS_CASE(3) RMS_CASE(4) RMS_CASE(5) RMS_CASE(6)      \
    RMS_CASE(7) RMS_CASE(8) RMS_CASE(9) RMS_CASE(10) RMS_CASE(11) RMS_CASE(12) RMS_CASE(13)  \
    RMS_CASE(14) RMS_CASE(15) default: break; }
#define RMS_ARGS float *restrict param, float *restrict grad, float *restrict square_avg,     \
                 float *restrict buf, float *restrict grad_avg, size_t n,                    \
                 const rmsprop_scalars *s

static void rmsprop_baseline(RMS_ARGS) { RMS_SELECT }
#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3 static void rmsprop_x86_64_v3(RMS_ARGS) { RMS_SELECT }
FO_TARGET_X86_64_V4 static void rmsprop_x86_64_v4(RMS_ARGS) { RMS_SELECT }
#endif

typedef struct {
    fo_isa isa;
    float *param, *grad, *square_avg, *momentum_buffer, *grad_avg;
} rmsprop_ctx;

static void rmsprop_range(const void *ctx, const void *group, size_t lo, size_t hi)
{
    const rmsprop_ctx *c = ctx;
    rmsprop_scalars s;
    rmsprop_prepare(&s, group);
    float *buf = (s.modes & RMS_MOMENTUM) ? c->momentum_buffer + lo : NULL;
    float *gavg = (s.modes & RMS_CENTERED) ? c->grad_avg + lo : NULL;
    switch (c->isa) {
#if FO_HAVE_X86_64
    case FO_ISA_X86_64_V4:
        rmsprop_x86_64_v4(c->param + lo, c->grad + lo, c->square_avg + lo, buf, gavg, hi - lo,
                          &s);
        return;
    case FO_ISA_X86_64_V3:
        rmsprop_x86_64_v3(c->param + lo, c->grad + lo, c->square_avg + lo, buf, gavg, hi - lo,
                          &s);
        return;
#endif
    default:
        rmsprop_baseline(c->param + lo, c->grad + lo, c->square_avg + lo, buf, gavg, hi - lo, &s);
    }
}

void fo_rmsprop(const fo_exec *ex, float *restrict param, float *restrict grad,
                float *restrict square_avg, float *restrict momentum_buffer,
                float *restrict grad_avg, const fo_rmsprop_group *groups, size_t ngroups)
{
    const rmsprop_ctx c = {ex->isa, param, grad, square_avg, momentum_buffer, grad_avg};
    fo_run_groups(ex, groups, ngroups, sizeof *groups, rmsprop_range, &c);
}
