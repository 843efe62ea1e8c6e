/*
 * Adam and AdamW (torch.optim.Adam / AdamW, fused=True semantics), one pass per step.
 *
 * Per step, in double, rounded to float32 once (f):
 *   bc1 = 1 - beta1^t    bc2 = 1 - beta2^t    ss = lr / bc1    bc2s = sqrt(bc2)
 * Per element, in float32, fma = one rounding:
 *   maximize:     g = -g
 *   Adam  (L2):   g = fma(p, f(wd), g)                        (only when wd != 0)
 *   AdamW:        p = p * f(1 - lr*wd)                        (on the old param)
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

#include "isa.h"

typedef struct {
    float neg_step_size, bc2_sqrt, eps, weight_decay, decay;
    float beta2, one_minus_beta2;
    float lerp_coeff;   /* w or w-1, see lerp_from_grad */
    int lerp_from_grad; /* torch's lerp switches formula at w >= 0.5 */
} adam_scalars;

FO_INLINE void adam_body(float *restrict param, const float *restrict grad,
                         float *restrict exp_avg, float *restrict exp_avg_sq,
                         float *restrict max_exp_avg_sq, size_t n, const adam_scalars *s,
                         const int amsgrad, const int l2_decay, const int lerp_from_grad,
                         const float sign)
{
    const float neg_step_size = s->neg_step_size, bc2_sqrt = s->bc2_sqrt, eps = s->eps;
    const float weight_decay = s->weight_decay, decay = s->decay;
    const float beta2 = s->beta2, one_minus_beta2 = s->one_minus_beta2;
    const float lerp_coeff = s->lerp_coeff;
    for (size_t i = 0; i < n; i++) {
        float p = param[i] * decay;   /* decay is exactly 1 unless AdamW */
        float g = grad[i] * sign;     /* sign is exactly +-1 */
        if (l2_decay)
            g = fmaf(param[i], weight_decay, g);
        const float m_old = exp_avg[i];
        const float m = fmaf(lerp_coeff, g - m_old, lerp_from_grad ? g : m_old);
        float v = fmaf(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        if (amsgrad) {
            /* torch's maximum: a NaN in either operand propagates (written as two selects so
             * that the loop stays branch-free and vectorizes) */
            const float vmax = max_exp_avg_sq[i];
            v = vmax > v ? vmax : v;       /* v if v is NaN */
            v = vmax != vmax ? vmax : v;   /* vmax if vmax is NaN */
            max_exp_avg_sq[i] = v;
        }
        const float denom = sqrtf(v) / bc2_sqrt + eps;
        param[i] = p + (neg_step_size * m) / denom;
    }
}

/* Turns the loop-invariant modes into constants so that each instantiation is branch-free. */
FO_INLINE void adam_select(float *restrict param, const float *restrict grad,
                           float *restrict exp_avg, float *restrict exp_avg_sq,
                           float *restrict max_exp_avg_sq, size_t n, const adam_scalars *s,
                           int amsgrad, int l2_decay, float sign)
{
#define ADAM_CALL(A, L2, LG) \
    adam_body(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s, A, L2, LG, sign)
    if (amsgrad) {
        if (l2_decay) {
            if (s->lerp_from_grad) ADAM_CALL(1, 1, 1); else ADAM_CALL(1, 1, 0);
        } else {
            if (s->lerp_from_grad) ADAM_CALL(1, 0, 1); else ADAM_CALL(1, 0, 0);
        }
    } else {
        if (l2_decay) {
            if (s->lerp_from_grad) ADAM_CALL(0, 1, 1); else ADAM_CALL(0, 1, 0);
        } else {
            if (s->lerp_from_grad) ADAM_CALL(0, 0, 1); else ADAM_CALL(0, 0, 0);
        }
    }
#undef ADAM_CALL
}

static void adam_baseline(float *restrict param, const float *restrict grad,
                          float *restrict exp_avg, float *restrict exp_avg_sq,
                          float *restrict max_exp_avg_sq, size_t n, const adam_scalars *s,
                          int amsgrad, int l2_decay, float sign)
{
    adam_select(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s, amsgrad, l2_decay, sign);
}

#if FO_HAVE_X86_64_V3
FO_TARGET_X86_64_V3
static void adam_x86_64_v3(float *restrict param, const float *restrict grad,
                           float *restrict exp_avg, float *restrict exp_avg_sq,
                           float *restrict max_exp_avg_sq, size_t n, const adam_scalars *s,
                           int amsgrad, int l2_decay, float sign)
{
    adam_select(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s, amsgrad, l2_decay, sign);
}
#endif

void fo_adam(fo_isa isa, float *restrict param, const float *restrict grad,
             float *restrict exp_avg, float *restrict exp_avg_sq,
             float *restrict max_exp_avg_sq, size_t n, const fo_adam_hparams *hp)
{
    const double bc1 = 1.0 - pow(hp->beta1, (double)hp->step);
    const double bc2 = 1.0 - pow(hp->beta2, (double)hp->step);
    adam_scalars s;
    s.neg_step_size = fo_f32(-(hp->lr / bc1));
    s.bc2_sqrt = fo_f32(sqrt(bc2));
    s.eps = fo_f32(hp->eps);
    s.weight_decay = fo_f32(hp->weight_decay);
    s.decay = hp->decoupled ? fo_f32(1.0 - hp->lr * hp->weight_decay) : 1.0f;
    s.beta2 = fo_f32(hp->beta2);
    s.one_minus_beta2 = fo_f32(1.0 - hp->beta2);
    const float w = fo_f32(1.0 - hp->beta1);
    s.lerp_from_grad = !(fabsf(w) < 0.5f);
    s.lerp_coeff = s.lerp_from_grad ? w - 1.0f : w;
    const int l2_decay = !hp->decoupled && hp->weight_decay != 0.0;
    const float sign = hp->maximize ? -1.0f : 1.0f;

#if FO_HAVE_X86_64_V3
    if (isa == FO_ISA_X86_64_V3) {
        adam_x86_64_v3(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, &s,
                       hp->amsgrad, l2_decay, sign);
        return;
    }
#endif
    (void)isa;
    adam_baseline(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, &s,
                  hp->amsgrad, l2_decay, sign);
}
