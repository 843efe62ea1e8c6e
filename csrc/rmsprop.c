/*
 * RMSprop, plain and centered, with momentum and weight decay (torch.optim.RMSprop), one pass
 * per step.  Scalars are rounded to float32 once (f); fma = one rounding.
 *
 *   maximize:       g = -g
 *   weight decay:   g = fma(p, f(wd), g)                          (only when wd != 0)
 *   sa = fma(f(1-alpha)*g, g, sa*f(alpha))
 *   centered:       ga = lerp(ga, g, f(1-alpha))                  (torch's lerp, as in adam.c)
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

#include "isa.h"

typedef struct {
    float neg_lr, weight_decay, alpha, one_minus_alpha, eps, momentum, sign;
    float lerp_coeff;
    int lerp_from_grad;
} rmsprop_scalars;

FO_INLINE void rmsprop_body(float *restrict param, const float *restrict grad,
                            float *restrict square_avg, float *restrict buf,
                            float *restrict grad_avg, size_t n, const rmsprop_scalars *s,
                            const int centered, const int use_momentum, const int l2_decay,
                            const int lerp_from_grad)
{
    const float neg_lr = s->neg_lr, weight_decay = s->weight_decay, alpha = s->alpha;
    const float one_minus_alpha = s->one_minus_alpha, eps = s->eps, momentum = s->momentum;
    const float sign = s->sign, lerp_coeff = s->lerp_coeff;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = grad[i] * sign;   /* sign is exactly +-1 */
        if (l2_decay)
            g = fmaf(p, weight_decay, g);
        const float sa = fmaf(one_minus_alpha * g, g, square_avg[i] * alpha);
        square_avg[i] = sa;
        float avg;
        if (centered) {
            const float ga_old = grad_avg[i];
            const float ga = fmaf(lerp_coeff, g - ga_old, lerp_from_grad ? g : ga_old);
            grad_avg[i] = ga;
            avg = sqrtf(fmaf(-ga, ga, sa));
        } else {
            avg = sqrtf(sa);
        }
        avg = avg + eps;
        if (use_momentum) {
            const float b = buf[i] * momentum + g / avg;
            buf[i] = b;
            param[i] = fmaf(b, neg_lr, p);
        } else {
            param[i] = p + (neg_lr * g) / avg;
        }
    }
}

FO_INLINE void rmsprop_select(float *restrict param, const float *restrict grad,
                              float *restrict square_avg, float *restrict buf,
                              float *restrict grad_avg, size_t n, const rmsprop_scalars *s,
                              int centered, int use_momentum, int l2_decay)
{
#define RMS_CALL(C, M, L2, LG) \
    rmsprop_body(param, grad, square_avg, buf, grad_avg, n, s, C, M, L2, LG)
    if (!centered) {
        if (use_momentum) {
            if (l2_decay) RMS_CALL(0, 1, 1, 0); else RMS_CALL(0, 1, 0, 0);
        } else {
            if (l2_decay) RMS_CALL(0, 0, 1, 0); else RMS_CALL(0, 0, 0, 0);
        }
    } else if (!s->lerp_from_grad) {
        if (use_momentum) {
            if (l2_decay) RMS_CALL(1, 1, 1, 0); else RMS_CALL(1, 1, 0, 0);
        } else {
            if (l2_decay) RMS_CALL(1, 0, 1, 0); else RMS_CALL(1, 0, 0, 0);
        }
    } else {
        if (use_momentum) {
            if (l2_decay) RMS_CALL(1, 1, 1, 1); else RMS_CALL(1, 1, 0, 1);
        } else {
            if (l2_decay) RMS_CALL(1, 0, 1, 1); else RMS_CALL(1, 0, 0, 1);
        }
    }
#undef RMS_CALL
}

static void rmsprop_baseline(float *restrict param, const float *restrict grad,
                             float *restrict square_avg, float *restrict buf,
                             float *restrict grad_avg, size_t n, const rmsprop_scalars *s,
                             int centered, int use_momentum, int l2_decay)
{
    rmsprop_select(param, grad, square_avg, buf, grad_avg, n, s, centered, use_momentum, l2_decay);
}

#if FO_HAVE_X86_64_V3
FO_TARGET_X86_64_V3
static void rmsprop_x86_64_v3(float *restrict param, const float *restrict grad,
                              float *restrict square_avg, float *restrict buf,
                              float *restrict grad_avg, size_t n, const rmsprop_scalars *s,
                              int centered, int use_momentum, int l2_decay)
{
    rmsprop_select(param, grad, square_avg, buf, grad_avg, n, s, centered, use_momentum, l2_decay);
}
#endif

void fo_rmsprop(fo_isa isa, float *restrict param, const float *restrict grad,
                float *restrict square_avg, float *restrict momentum_buffer,
                float *restrict grad_avg, size_t n, const fo_rmsprop_hparams *hp)
{
    rmsprop_scalars s;
    s.neg_lr = fo_f32(-hp->lr);
    s.weight_decay = fo_f32(hp->weight_decay);
    s.alpha = fo_f32(hp->alpha);
    s.one_minus_alpha = fo_f32(1.0 - hp->alpha);
    s.eps = fo_f32(hp->eps);
    s.momentum = fo_f32(hp->momentum);
    s.sign = hp->maximize ? -1.0f : 1.0f;
    s.lerp_from_grad = !(fabsf(s.one_minus_alpha) < 0.5f);
    s.lerp_coeff = s.lerp_from_grad ? s.one_minus_alpha - 1.0f : s.one_minus_alpha;
    const int use_momentum = hp->momentum > 0.0;
    const int l2_decay = hp->weight_decay != 0.0;

#if FO_HAVE_X86_64_V3
    if (isa == FO_ISA_X86_64_V3) {
        rmsprop_x86_64_v3(param, grad, square_avg, momentum_buffer, grad_avg, n, &s,
                          hp->centered, use_momentum, l2_decay);
        return;
    }
#endif
    (void)isa;
    rmsprop_baseline(param, grad, square_avg, momentum_buffer, grad_avg, n, &s,
                     hp->centered, use_momentum, l2_decay);
}
