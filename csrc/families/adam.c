/*
 * Adam and AdamW (torch.optim.Adam / AdamW, fused=True semantics), one pass per step.
 *
 * Per step, in double, rounded to float32 once (f):
 *   bc1 = 1 - beta1^t    bc2 = 1 - beta2^t    ss = lr / bc1    bc2s = sqrt(bc2)
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:    grad = 0                                (after it is read, same pass)
 *   Adam  (L2):   g = fma(p, f(wd), g)                    (only when wd != 0)
 *   AdamW:        p = p * f(1 - lr*wd)                    (on the old param)
 *   m = lerp(m, g, f(1-beta1))    torch's lerp: w < 0.5 ? fma(w, g-m, m) : fma(w-1, g-m, g)
 *   v = fma(f(1-beta2)*g, g, v*f(beta2))
 *   amsgrad:      vmax = max(vmax, v), and vmax stands for v below
 *   denom = sqrt(v) / f(bc2s) + f(eps)      IEEE sqrt and divide; eps after the bias correction
 *   p = p + (f(-ss)*m) / denom
 *
 * torch's own vector loop computes exactly this; its scalar tail (the last numel % 8 elements
 * of each tensor) groups the v update as fma(v, f(beta2), (f(1-beta2)*g)*g).  We use the
 * vector formula everywhere, so an arena has no per-tensor tails.
 */
#include <math.h>

#include "../internal.h"

#define ADAM_FIELDS(X)                                                                       \
    X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay)   \
    X(int32_t, decoupled) X(int32_t, amsgrad) X(int32_t, maximize)
FO_HPARAMS(adam, ADAM_FIELDS)
static const char *const adam_buffers[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};

typedef struct {
    float grad_factor, neg_step_size, bc2_sqrt, eps;
    fo_moments moments;
} adam_scalars;

enum { ADAM_AMSGRAD = FO_MODE(0), ADAM_L2 = FO_MODE(1) };

static unsigned adam_needs(const adam_hparams *hp)
{
    return hp->amsgrad ? 7u : 3u;
}

static unsigned adam_prepare(adam_scalars *s, const adam_hparams *hp, int64_t step,
                             const fo_grad_opts *o)
{
    const double bc1 = 1.0 - pow(hp->beta1, (double)step);
    const double bc2 = 1.0 - pow(hp->beta2, (double)step);
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_step_size = fo_f32(-(hp->lr / bc1));
    s->bc2_sqrt = fo_f32(sqrt(bc2));
    s->eps = fo_f32(hp->eps);
    const int l2 = fo_moments_prepare(&s->moments, hp->lr, hp->beta1, hp->beta2,
                                      hp->weight_decay, hp->decoupled);
    return (hp->amsgrad ? ADAM_AMSGRAD : 0u) | (l2 ? ADAM_L2 : 0u);
}

/* s0 = exp_avg, s1 = exp_avg_sq, s2 = max_exp_avg_sq */
FO_INLINE void adam_body(FO_BODY_ARGS(adam))
{
    const float grad_factor = s->grad_factor, neg_step_size = s->neg_step_size;
    const float bc2_sqrt = s->bc2_sqrt, eps = s->eps;
    const fo_moments moments = s->moments;
    for (size_t i = 0; i < n; i++) {
        const float g = fo_read_grad(grad, i, grad_factor, modes);
        const fo_moments_out o = fo_moments_apply(moments, modes & ADAM_L2, g, param[i],
                                                  FO_GET(0, i), FO_GET(1, i));
        const float m = o.m;
        float v = o.v;
        FO_PUT(0, i, m);
        FO_PUT(1, i, v);
        if (modes & ADAM_AMSGRAD) {
            /* torch's maximum: a NaN in either operand propagates (written as two selects so
             * that the loop stays branch-free and vectorizes) */
            const float vmax = FO_GET(2, i);
            v = vmax > v ? vmax : v;       /* v if v is NaN */
            v = vmax != vmax ? vmax : v;   /* vmax if vmax is NaN */
            FO_PUT(2, i, v);
        }
        const float denom = sqrtf(v) / bc2_sqrt + eps;
        param[i] = o.p + (neg_step_size * m) / denom;   /* o.p: decayed only by AdamW */
    }
}

FO_FAMILY(adam, 8)
