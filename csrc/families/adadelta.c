/*
 * Adadelta (torch.optim.Adadelta, foreach=False semantics), one pass per step.
 * Scalars are rounded to float32 once (f); fma = one rounding.
 *
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:      grad = 0                              (after it is read, same pass)
 *   weight decay:   g = fma(p, f(wd), g)                  (only when wd != 0)
 *   sa = fma(f(1-rho)*g, g, sa*f(rho))
 *   std   = sqrt(sa + f(eps))
 *   delta = (sqrt(ad + f(eps)) / std) * g                 (the old ad)
 *   ad = fma(f(1-rho)*delta, delta, ad*f(rho))
 *   p = fma(delta, f(-lr), p)
 *
 * This is torch's single-tensor loop op for op, with IEEE sqrt.  torch's sqrt on the CPU is
 * MKL's vmsSqrt, which is only faithfully rounded (about 1 in 6 results is 1 ulp away from
 * IEEE, and which ones depends on the CPU), so torch and this kernel agree to a few ulp, not
 * bitwise.  The step count is not used.
 */
#include <math.h>

#include "../internal.h"

#define ADADELTA_FIELDS(X)                                                                   \
    X(double, lr) X(double, rho) X(double, eps) X(double, weight_decay) X(int32_t, maximize)
FO_HPARAMS(adadelta, ADADELTA_FIELDS)
static const char *const adadelta_buffers[] = {"square_avg", "acc_delta"};

typedef struct {
    float grad_factor, neg_lr, weight_decay, rho, one_minus_rho, eps;
} adadelta_scalars;

enum { ADADELTA_L2 = FO_MODE(0) };

static unsigned adadelta_needs(const adadelta_hparams *hp)
{
    (void)hp;
    return 3u;
}

static unsigned adadelta_prepare(adadelta_scalars *s, const adadelta_hparams *hp, int64_t step,
                                 const fo_grad_opts *o)
{
    (void)step;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->rho = fo_f32(hp->rho);
    s->one_minus_rho = fo_f32(1.0 - hp->rho);
    s->eps = fo_f32(hp->eps);
    return hp->weight_decay != 0.0 ? ADADELTA_L2 : 0u;
}

/* s0 = square_avg, s1 = acc_delta */
FO_INLINE void adadelta_body(FO_BODY_ARGS(adadelta))
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr;
    const float weight_decay = s->weight_decay, rho = s->rho;
    const float one_minus_rho = s->one_minus_rho, eps = s->eps;
    (void)s2;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = fo_read_grad(grad, i, grad_factor, modes);
        if (modes & ADADELTA_L2)
            g = fmaf(p, weight_decay, g);
        const float sa = fmaf(one_minus_rho * g, g, FO_GET(0, i) * rho);
        FO_PUT(0, i, sa);
        const float std = sqrtf(sa + eps);
        const float ad_old = FO_GET(1, i);
        const float delta = (sqrtf(ad_old + eps) / std) * g;
        FO_PUT(1, i, fmaf(one_minus_rho * delta, delta, ad_old * rho));
        param[i] = fmaf(delta, neg_lr, p);
    }
}

FO_FAMILY(adadelta, 4)
