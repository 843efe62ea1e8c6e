/*
 * Adagrad with learning-rate decay and weight decay (torch.optim.Adagrad, fused=True
 * semantics), one pass per step.
 *
 * Per step, in double, rounded to float32 once (f):
 *   clr = lr / (1 + (t-1)*lr_decay)            t: the step being taken (1-based)
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:    grad = 0                                (after it is read, same pass)
 *   weight decay: g = fma(p, f(wd), g)                    (only when wd != 0)
 *   sum = fma(g, g, sum)
 *   std = sqrt(sum) + f(eps)                              IEEE sqrt
 *   p = p - (f(clr)*g) / std
 *
 * This is torch's FusedAdagradKernel (CPU, float32) as GCC compiles it: the weight-decay and
 * sum updates are contracted to fmas, in its vector body and in its scalar tail alike, and its
 * sqrt is IEEE (_mm256_sqrt_ps / std::sqrt).  The caller fills `sum` with
 * initial_accumulator_value before the first step.
 */
#include <math.h>

#include "../internal.h"

#define ADAGRAD_FIELDS(X)                                                                    \
    X(double, lr) X(double, lr_decay) X(double, weight_decay) X(double, eps)                 \
    X(int32_t, maximize)
FO_HPARAMS(adagrad, ADAGRAD_FIELDS)
static const char *const adagrad_buffers[] = {"sum"};

typedef struct {
    float grad_factor, clr, weight_decay, eps;
} adagrad_scalars;

enum { ADAGRAD_L2 = FO_MODE(0) };

static unsigned adagrad_needs(const adagrad_hparams *hp)
{
    (void)hp;
    return 1u;
}

static unsigned adagrad_prepare(adagrad_scalars *s, const adagrad_hparams *hp, int64_t step,
                                const fo_grad_opts *o)
{
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->clr = fo_f32(hp->lr / (1.0 + ((double)step - 1.0) * hp->lr_decay));
    s->weight_decay = fo_f32(hp->weight_decay);
    s->eps = fo_f32(hp->eps);
    return hp->weight_decay != 0.0 ? ADAGRAD_L2 : 0u;
}

/* s0 = sum */
FO_INLINE void adagrad_body(FO_BODY_ARGS(adagrad))
{
    const float grad_factor = s->grad_factor, clr = s->clr;
    const float weight_decay = s->weight_decay, eps = s->eps;
    (void)s1;
    (void)s2;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = fo_read_grad(grad, i, grad_factor, modes);
        if (modes & ADAGRAD_L2)
            g = fmaf(p, weight_decay, g);
        const float sum = fmaf(g, g, FO_GET(0, i));
        FO_PUT(0, i, sum);
        const float std = sqrtf(sum) + eps;
        param[i] = p - (clr * g) / std;
    }
}

FO_FAMILY(adagrad, 4)
