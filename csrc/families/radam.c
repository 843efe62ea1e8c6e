/*
 * RAdam and RAdamW (torch.optim.RAdam, decoupled_weight_decay=False / True), one pass per step.
 *
 * Per step, in double as torch's Python computes them (pow() where it has **, including
 * ** 0.5, which differs from sqrt() in the last bit for about 1 double in 1000), each update
 * scalar rounded to float32 once (f):
 *   bc1 = 1 - beta1^t    bc2 = 1 - beta2^t
 *   rho_inf = 2/(1-beta2) - 1       rho_t = rho_inf - 2*t*beta2^t / bc2   (left to right)
 *   rectified = rho_t > 5           (a mode: the loop below is the one or the other)
 *   rect = ((rho_t-4)*(rho_t-2)*rho_inf / ((rho_inf-4)*(rho_inf-2)*rho_t)) ^ 0.5
 * Per element, in float32, fma = one rounding:
 *   g = grad * f(grad_multiplier), negated when maximize   (a multiplier of 1 changes nothing)
 *   zero_grad:    grad = 0                                (after it is read, same pass)
 *   RAdam  (L2):  g = fma(p, f(wd), g)                    (only when wd != 0)
 *   RAdamW:       p = p * f(1 - lr*wd)                    (first, on every step)
 *   m = lerp(m, g, f(1-beta1))    torch's lerp: w < 0.5 ? fma(w, g-m, m) : fma(w-1, g-m, g)
 *   v = fma(f(1-beta2)*g, g, v*f(beta2))
 *   mhat = m / f(bc1)
 *   rectified:    adaptive = (1 / (sqrt(v) + f(eps))) * f(bc2^0.5)   (torch's float / tensor
 *                                                         is a reciprocal, then a product)
 *                 p = p - ((mhat*f(lr)) * adaptive) * f(rect)
 *   otherwise     p = p - mhat*f(lr)
 *
 * This is torch's single-tensor (foreach=False) sequence op for op; torch has no fused RAdam.
 * The one difference: torch's sqrt is MKL's vmsSqrt, which is only faithfully rounded (about
 * 1 in 6 results is 1 ulp off the correctly rounded one, and which ones depends on the CPU);
 * sqrtf here is IEEE, so the two agree to a few ulp on rectified steps, not bitwise.
 */
#include <math.h>

#include "../internal.h"

#define RADAM_FIELDS(X)                                                                      \
    X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay)   \
    X(int32_t, decoupled) X(int32_t, maximize)
FO_HPARAMS(radam, RADAM_FIELDS)
static const char *const radam_buffers[] = {"exp_avg", "exp_avg_sq"};

typedef struct {
    float grad_factor, lr, bc1, bc2_sqrt, rect, eps;
    fo_moments moments;
} radam_scalars;

enum { RADAM_L2 = FO_MODE(0), RADAM_RECTIFIED = FO_MODE(1) };

static unsigned radam_needs(const radam_hparams *hp)
{
    (void)hp;
    return 3u;
}

static unsigned radam_prepare(radam_scalars *s, const radam_hparams *hp, int64_t step,
                              const fo_grad_opts *o)
{
    const double t = (double)step;
    const double bc1 = 1.0 - pow(hp->beta1, t);
    const double bc2 = 1.0 - pow(hp->beta2, t);
    const double rho_inf = 2.0 / (1.0 - hp->beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * t * pow(hp->beta2, t) / bc2;
    const int rectified = rho_t > 5.0;
    s->grad_factor = fo_grad_factor(o, hp->maximize);
    s->lr = fo_f32(hp->lr);
    s->bc1 = fo_f32(bc1);
    s->bc2_sqrt = rectified ? fo_f32(pow(bc2, 0.5)) : 0.0f;
    s->rect = rectified ? fo_f32(pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5))
                        : 0.0f;
    s->eps = fo_f32(hp->eps);
    const int l2 = fo_moments_prepare(&s->moments, hp->lr, hp->beta1, hp->beta2,
                                      hp->weight_decay, hp->decoupled);
    return (l2 ? RADAM_L2 : 0u)
         | (rectified ? RADAM_RECTIFIED : 0u);
}

/* s0 = exp_avg, s1 = exp_avg_sq */
FO_INLINE void radam_body(FO_BODY_ARGS(radam))
{
    (void)s2;
    const float grad_factor = s->grad_factor, lr = s->lr, bc1 = s->bc1;
    const float bc2_sqrt = s->bc2_sqrt, rect = s->rect, eps = s->eps;
    const fo_moments moments = s->moments;
    for (size_t i = 0; i < n; i++) {
        const fo_moments_out o = fo_moments_apply(moments, modes & RADAM_L2,
                                                  fo_read_grad(grad, i, grad_factor, modes),
                                                  param[i], FO_GET(0, i), FO_GET(1, i));
        const float p = o.p, m = o.m, v = o.v;   /* p: decayed only when decoupled */
        FO_PUT(0, i, m);
        FO_PUT(1, i, v);
        const float step = (m / bc1) * lr;
        if (modes & RADAM_RECTIFIED) {
            const float adaptive = (1.0f / (sqrtf(v) + eps)) * bc2_sqrt;
            param[i] = p - (step * adaptive) * rect;
        } else {
            param[i] = p - step;
        }
    }
}

FO_FAMILY(radam, 8)
