/*
 * NAdam and NAdamW (torch.optim.NAdam, decoupled_weight_decay=False / True), one pass per step.
 *
 * Per step, in double as torch's Python computes them (pow() where it has **), each update
 * scalar rounded to float32 once (f):
 *   mu      = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
 *   mu_next = beta1 * (1 - 0.5 * 0.96^((t+1) * momentum_decay))
 *   mp      = the group's mu_product AFTER this step: torch keeps it in a float32 tensor and
 *             multiplies it by f(mu) each step, so the caller hands it in already rounded
 *             (families.py computes it; it is a float32 value widened to double)
 *   mp_next = mp * mu_next                          (double: torch takes .item() first)
 *   bc2 = 1 - beta2^t
 *   c_grad = f(-lr * (1 - mu) / (1 - mp))     c_avg = f(-lr * mu_next / (1 - mp_next))
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:    grad = 0                                (after it is read, same pass)
 *   NAdam  (L2):  g = fma(p, f(wd), g)                    (only when wd != 0)
 *   NAdamW:       p = p * f(1 - lr*wd)                    (first, as torch's param.mul_)
 *   m = lerp(m, g, f(1-beta1))    torch's lerp: w < 0.5 ? fma(w, g-m, m) : fma(w-1, g-m, g)
 *   v = fma(f(1-beta2)*g, g, v*f(beta2))
 *   denom = sqrt(v / f(bc2)) + f(eps)
 *   p = p + (c_grad*g) / denom                            (two addcdivs, each rounded)
 *   p = p + (c_avg*m) / denom
 *
 * This is torch's single-tensor (foreach=False) sequence op for op; torch has no fused NAdam.
 * The one difference: torch's sqrt is MKL's vmsSqrt, which is only faithfully rounded (about
 * 1 in 6 results is 1 ulp off the correctly rounded one, and which ones depends on the CPU);
 * sqrtf here is IEEE, so the two agree to a few ulp, not bitwise.
 */
#include <math.h>

#include "../internal.h"

/* mu_product is derived (never given by the caller), so it comes after the user's fields, as
 * families.py orders them; the two int32 flags before it keep it 8-byte aligned. */
#define NADAM_FIELDS(X)                                                                      \
    X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay)   \
    X(double, momentum_decay) X(int32_t, decoupled) X(int32_t, maximize) X(double, mu_product)
FO_HPARAMS(nadam, NADAM_FIELDS)
static const char *const nadam_buffers[] = {"exp_avg", "exp_avg_sq"};

typedef struct {
    float grad_factor, coeff_grad, coeff_avg, bc2, eps;
    fo_moments moments;
} nadam_scalars;

enum { NADAM_L2 = FO_MODE(0) };

static unsigned nadam_needs(const nadam_hparams *hp)
{
    (void)hp;
    return 3u;
}

static unsigned nadam_prepare(nadam_scalars *s, const nadam_hparams *hp, int64_t step,
                              const fo_grad_opts *o)
{
    const double t = (double)step;
    const double mu = hp->beta1 * (1.0 - 0.5 * pow(0.96, t * hp->momentum_decay));
    const double mu_next = hp->beta1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * hp->momentum_decay));
    const double mp = hp->mu_product;
    const double mp_next = mp * mu_next;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->coeff_grad = fo_f32(-hp->lr * (1.0 - mu) / (1.0 - mp));
    s->coeff_avg = fo_f32((-hp->lr * mu_next) / (1.0 - mp_next));
    s->bc2 = fo_f32(1.0 - pow(hp->beta2, t));
    s->eps = fo_f32(hp->eps);
    const int l2 = fo_moments_prepare(&s->moments, hp->lr, hp->beta1, hp->beta2,
                                      hp->weight_decay, hp->decoupled);
    return l2 ? NADAM_L2 : 0u;
}

/* s0 = exp_avg, s1 = exp_avg_sq */
FO_INLINE void nadam_body(FO_BODY_ARGS(nadam))
{
    (void)s2;
    const float grad_factor = s->grad_factor, coeff_grad = s->coeff_grad;
    const float coeff_avg = s->coeff_avg, bc2 = s->bc2, eps = s->eps;
    const fo_moments moments = s->moments;
    for (size_t i = 0; i < n; i++) {
        const fo_moments_out o = fo_moments_apply(moments, modes & NADAM_L2,
                                                  fo_read_grad(grad, i, grad_factor, modes),
                                                  param[i], FO_GET(0, i), FO_GET(1, i));
        const float g = o.g, p = o.p, m = o.m, v = o.v;   /* p: decayed only when decoupled */
        FO_PUT(0, i, m);
        FO_PUT(1, i, v);
        const float denom = sqrtf(v / bc2) + eps;
        const float p1 = p + (coeff_grad * g) / denom;
        param[i] = p1 + (coeff_avg * m) / denom;
    }
}

FO_FAMILY(nadam, 4)
