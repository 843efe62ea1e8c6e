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

#include "../internal.h"

#define RMSPROP_FIELDS(X)                                                                    \
    X(double, lr) X(double, alpha) X(double, eps) X(double, weight_decay) X(double, momentum) \
    X(int32_t, centered) X(int32_t, maximize)
FO_HPARAMS(rmsprop, RMSPROP_FIELDS)
static const char *const rmsprop_buffers[] = {"square_avg", "momentum_buffer", "grad_avg"};

typedef struct {
    float grad_factor, neg_lr, weight_decay, alpha, one_minus_alpha, eps, momentum;
    fo_lerp lerp;       /* grad_avg's weight f(1-alpha) */
} rmsprop_scalars;

enum { RMS_CENTERED = FO_MODE(0), RMS_MOMENTUM = FO_MODE(1), RMS_L2 = FO_MODE(2) };

static unsigned rmsprop_needs(const rmsprop_hparams *hp)
{
    return 1u | (hp->momentum > 0.0 ? 2u : 0u) | (hp->centered ? 4u : 0u);
}

static unsigned rmsprop_prepare(rmsprop_scalars *s, const rmsprop_hparams *hp, int64_t step,
                                const fo_grad_opts *o)
{
    (void)step;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->alpha = fo_f32(hp->alpha);
    s->one_minus_alpha = fo_f32(1.0 - hp->alpha);
    s->eps = fo_f32(hp->eps);
    s->momentum = fo_f32(hp->momentum);
    s->lerp = fo_lerp_weight(s->one_minus_alpha);
    return (hp->centered ? RMS_CENTERED : 0u) | (hp->momentum > 0.0 ? RMS_MOMENTUM : 0u)
         | (hp->weight_decay != 0.0 ? RMS_L2 : 0u);
}

/* s0 = square_avg, s1 = momentum_buffer, s2 = grad_avg */
FO_INLINE void rmsprop_body(FO_BODY_ARGS(rmsprop))
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr;
    const float weight_decay = s->weight_decay, alpha = s->alpha;
    const float one_minus_alpha = s->one_minus_alpha, eps = s->eps, momentum = s->momentum;
    const fo_lerp lerp = s->lerp;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = fo_read_grad(grad, i, grad_factor, modes);
        if (modes & RMS_L2)
            g = fmaf(p, weight_decay, g);
        const float sa = fmaf(one_minus_alpha * g, g, FO_GET(0, i) * alpha);
        FO_PUT(0, i, sa);
        float avg;
        if (modes & RMS_CENTERED) {
            const float ga_old = FO_GET(2, i);
            const float ga = fo_lerp_apply(lerp, ga_old, g);
            FO_PUT(2, i, ga);
            avg = sqrtf(fmaf(-ga, ga, sa));
        } else {
            avg = sqrtf(sa);
        }
        avg = avg + eps;
        if (modes & RMS_MOMENTUM) {
            const float b = FO_GET(1, i) * momentum + g / avg;
            FO_PUT(1, i, b);
            param[i] = fmaf(b, neg_lr, p);
        } else {
            param[i] = p + (neg_lr * g) / avg;
        }
    }
}

FO_FAMILY(rmsprop, 16)
