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
#include <math.h>

#include "../internal.h"

/* first_step: 1 on the step that starts the momentum buffer (set to g, undamped); the caller
 * derives it from its state (the buffer has not been started), as torch does. */
#define SGD_FIELDS(X)                                                                        \
    X(double, lr) X(double, momentum) X(double, dampening) X(double, weight_decay)           \
    X(int32_t, nesterov) X(int32_t, maximize) X(int32_t, first_step)
FO_HPARAMS(sgd, SGD_FIELDS)
static const char *const sgd_buffers[] = {"momentum_buffer"};

typedef struct {
    float grad_factor, neg_lr, weight_decay, momentum, one_minus_dampening;
} sgd_scalars;

/* SGD_FIRST and SGD_LATER: the momentum buffer's two updates (neither: no momentum). */
enum { SGD_FIRST = FO_MODE(0), SGD_LATER = FO_MODE(1), SGD_NESTEROV = FO_MODE(2),
       SGD_L2 = FO_MODE(3) };

static unsigned sgd_needs(const sgd_hparams *hp)
{
    return hp->momentum != 0.0 ? 1u : 0u;
}

static unsigned sgd_prepare(sgd_scalars *s, const sgd_hparams *hp, int64_t step,
                            const fo_grad_opts *o)
{
    (void)step;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_lr = fo_f32(-hp->lr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->momentum = fo_f32(hp->momentum);
    s->one_minus_dampening = fo_f32(1.0 - hp->dampening);
    return (hp->momentum == 0.0 ? 0u : hp->first_step ? SGD_FIRST : SGD_LATER)
         | (hp->momentum != 0.0 && hp->nesterov ? SGD_NESTEROV : 0u)
         | (hp->weight_decay != 0.0 ? SGD_L2 : 0u);
}

/* s0 = momentum_buffer */
FO_INLINE void sgd_body(FO_BODY_ARGS(sgd))
{
    const float grad_factor = s->grad_factor, neg_lr = s->neg_lr;
    const float weight_decay = s->weight_decay, momentum = s->momentum;
    const float one_minus_dampening = s->one_minus_dampening;
    (void)s1;
    (void)s2;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = fo_read_grad(grad, i, grad_factor, modes);
        if (modes & SGD_L2)
            g = fmaf(p, weight_decay, g);
        if (modes & (SGD_FIRST | SGD_LATER)) {
            const float b = (modes & SGD_FIRST) ? g
                            : fmaf(g, one_minus_dampening, FO_GET(0, i) * momentum);
            FO_PUT(0, i, b);
            g = (modes & SGD_NESTEROV) ? fmaf(b, momentum, g) : b;
        }
        param[i] = fmaf(g, neg_lr, p);
    }
}

/* 32 instantiations, some never asked for (FIRST with LATER): harmless */
FO_FAMILY(sgd, 32)
