/*
 * Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), one pass per step:
 * the update of the paper's PyTorch reference (google/automl, lion/lion_pytorch.py) with every
 * rounding as torch performs those operations in float32.
 *
 * Per step, in double, rounded to float32 once (f):  decay = 1 - lr*wd
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:  grad = 0                                  (after it is read, same pass)
 *   p = p * f(decay)                                      p.mul_(1 - lr*wd), on the old param
 *   c = m*f(beta1) + g*f(1-beta1)                         three roundings, no fma
 *   p = p + sign(c)*f(-lr)                                p.add_(sign(c), alpha=-lr)
 *   m = fma(g, f(1-beta2), m*f(beta2))                    m.mul_(beta2).add_(g, alpha=1-beta2)
 *
 * sign(c) is +1, -1, or +0 for either zero, as torch.sign; but NaN for NaN, where torch.sign
 * gives 0 (a NaN gradient then moves the param to NaN instead of freezing it unseen).
 * sign(c)*f(-lr) is exact, so the param update is torch's fma(sign, f(-lr), p) bit for bit
 * without an fma.  c is only used through its sign, and the sign of the rounded sum of two
 * floats is the sign of the exact sum: the two rounded products are what matter.
 */
#include <math.h>

#include "../internal.h"

#define LION_FIELDS(X)                                                                       \
    X(double, lr) X(double, beta1) X(double, beta2) X(double, weight_decay)                  \
    X(int32_t, maximize)
FO_HPARAMS(lion, LION_FIELDS)
static const char *const lion_buffers[] = {"exp_avg"};

typedef struct {
    float grad_factor, neg_lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
} lion_scalars;

static unsigned lion_needs(const lion_hparams *hp)
{
    (void)hp;
    return 1u;
}

static unsigned lion_prepare(lion_scalars *s, const lion_hparams *hp, int64_t step,
                             const fo_grad_opts *o)
{
    (void)step;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->decay = fo_f32(1.0 - hp->lr * hp->weight_decay);   /* 1 exactly when wd = 0 */
    s->beta1 = fo_f32(hp->beta1);
    s->one_minus_beta1 = fo_f32(1.0 - hp->beta1);
    s->beta2 = fo_f32(hp->beta2);
    s->one_minus_beta2 = fo_f32(1.0 - hp->beta2);
    return 0u;
}

/* s0 = exp_avg */
FO_INLINE void lion_body(FO_BODY_ARGS(lion))
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr, decay = s->decay;
    const float beta1 = s->beta1, one_minus_beta1 = s->one_minus_beta1;
    const float beta2 = s->beta2, one_minus_beta2 = s->one_minus_beta2;
    (void)s1;
    (void)s2;
    for (size_t i = 0; i < n; i++) {
        const float g = fo_read_grad(grad, i, grad_factor, modes);
        const float m = FO_GET(0, i);
        const float c = m * beta1 + g * one_minus_beta1;
        /* selects, not branches, so that the loop vectorizes */
        float sign = c > 0.0f ? 1.0f : 0.0f;
        sign = c < 0.0f ? -1.0f : sign;
        sign = c != c ? c : sign;
        param[i] = param[i] * decay + sign * neg_lr;
        FO_PUT(0, i, fmaf(g, one_minus_beta2, m * beta2));
    }
}

FO_FAMILY(lion, 2)
