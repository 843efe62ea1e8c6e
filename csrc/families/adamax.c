/*
 * Adamax (torch.optim.Adamax, foreach=False semantics), one pass per step.
 *
 * Per step, in double, rounded to float32 once (f):
 *   clr = lr / (1 - beta1^t)
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:      grad = 0                              (after it is read, same pass)
 *   weight decay:   g = fma(p, f(wd), g)                  (only when wd != 0)
 *   m = lerp(m, g, f(1-beta1))    torch's lerp: w < 0.5 ? fma(w, g-m, m) : fma(w-1, g-m, g)
 *   u = max(u*f(beta2), |g| + f(eps))                     (NaN in either operand propagates)
 *   p = p + (f(-clr)*m) / u                               (addcdiv: three roundings, no fma)
 *
 * torch's single-tensor loop has no square root, and each of its ops rounds exactly as written
 * here (grad.add(param, alpha=wd) and lerp_ are fused multiply-adds in both its vector body and
 * its scalar tail), so this kernel is bitwise equal to torch.optim.Adamax(foreach=False).
 */
#include <math.h>

#include "../internal.h"

#define ADAMAX_FIELDS(X)                                                                     \
    X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay)   \
    X(int32_t, maximize)
FO_HPARAMS(adamax, ADAMAX_FIELDS)
static const char *const adamax_buffers[] = {"exp_avg", "exp_inf"};

typedef struct {
    float grad_factor, neg_clr, weight_decay, beta2, eps;
    fo_lerp lerp;       /* m's weight f(1-beta1) */
} adamax_scalars;

enum { ADAMAX_L2 = FO_MODE(0) };

static unsigned adamax_needs(const adamax_hparams *hp)
{
    (void)hp;
    return 3u;
}

static unsigned adamax_prepare(adamax_scalars *s, const adamax_hparams *hp, int64_t step,
                               const fo_grad_opts *o)
{
    const double clr = hp->lr / (1.0 - pow(hp->beta1, (double)step));
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->neg_clr = fo_f32(-clr);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->beta2 = fo_f32(hp->beta2);
    s->eps = fo_f32(hp->eps);
    const float w = fo_f32(1.0 - hp->beta1);
    s->lerp = fo_lerp_weight(w);
    return hp->weight_decay != 0.0 ? ADAMAX_L2 : 0u;
}

/* s0 = exp_avg, s1 = exp_inf */
FO_INLINE void adamax_body(FO_BODY_ARGS(adamax))
{
    const float grad_factor = s->grad_factor, neg_clr = s->neg_clr;
    const float weight_decay = s->weight_decay, beta2 = s->beta2, eps = s->eps;
    const fo_lerp lerp = s->lerp;
    (void)s2;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = fo_read_grad(grad, i, grad_factor, modes);
        if (modes & ADAMAX_L2)
            g = fmaf(p, weight_decay, g);
        const float m_old = FO_GET(0, i);
        const float m = fo_lerp_apply(lerp, m_old, g);
        FO_PUT(0, i, m);
        /* torch.maximum, NaN-propagating, as two selects so the loop stays branch-free */
        const float a = FO_GET(1, i) * beta2, b = fabsf(g) + eps;
        float u = a > b ? a : b;   /* b if b is NaN */
        u = a != a ? a : u;        /* a if a is NaN */
        FO_PUT(1, i, u);
        param[i] = p + (neg_clr * m) / u;
    }
}

FO_FAMILY(adamax, 4)
