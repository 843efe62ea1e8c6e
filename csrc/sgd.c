/*
 * SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD, fused=True
 * semantics), one pass per step.  Scalars are rounded to float32 once (f); fma = one rounding.
 *
 *   maximize:       g = -g
 *   weight decay:   g = fma(p, f(wd), g)                          (only when wd != 0)
 *   momentum > 0:   first step  buf = g                           (no dampening, as torch)
 *                   later       buf = fma(g, f(1-dampening), buf*f(momentum))
 *                   Nesterov    g = fma(buf, f(momentum), g)      (with the new buf)
 *                   otherwise   g = buf
 *   p = fma(g, f(-lr), p)
 *
 * torch's scalar tail (the last numel % 8 of each tensor) groups the later-step momentum
 * update as fma(buf, f(momentum), g*f(1-dampening)); we use the vector formula everywhere.
 */
#include <math.h>

#include "isa.h"

typedef struct {
    float neg_lr, weight_decay, momentum, one_minus_dampening, sign;
} sgd_scalars;

enum { SGD_PLAIN = 0, SGD_FIRST = 1, SGD_LATER = 2 };

FO_INLINE void sgd_body(float *restrict param, const float *restrict grad,
                        float *restrict buf, size_t n, const sgd_scalars *s,
                        const int mode, const int nesterov, const int l2_decay)
{
    const float neg_lr = s->neg_lr, weight_decay = s->weight_decay, momentum = s->momentum;
    const float one_minus_dampening = s->one_minus_dampening, sign = s->sign;
    for (size_t i = 0; i < n; i++) {
        const float p = param[i];
        float g = grad[i] * sign;   /* sign is exactly +-1 */
        if (l2_decay)
            g = fmaf(p, weight_decay, g);
        if (mode != SGD_PLAIN) {
            const float b = mode == SGD_FIRST ? g : fmaf(g, one_minus_dampening, buf[i] * momentum);
            buf[i] = b;
            g = nesterov ? fmaf(b, momentum, g) : b;
        }
        param[i] = fmaf(g, neg_lr, p);
    }
}

FO_INLINE void sgd_select(float *restrict param, const float *restrict grad,
                          float *restrict buf, size_t n, const sgd_scalars *s,
                          int mode, int nesterov, int l2_decay)
{
#define SGD_CALL(M, NS, L2) sgd_body(param, grad, buf, n, s, M, NS, L2)
    if (mode == SGD_PLAIN) {
        if (l2_decay) SGD_CALL(SGD_PLAIN, 0, 1); else SGD_CALL(SGD_PLAIN, 0, 0);
    } else if (mode == SGD_FIRST) {
        if (nesterov) {
            if (l2_decay) SGD_CALL(SGD_FIRST, 1, 1); else SGD_CALL(SGD_FIRST, 1, 0);
        } else {
            if (l2_decay) SGD_CALL(SGD_FIRST, 0, 1); else SGD_CALL(SGD_FIRST, 0, 0);
        }
    } else {
        if (nesterov) {
            if (l2_decay) SGD_CALL(SGD_LATER, 1, 1); else SGD_CALL(SGD_LATER, 1, 0);
        } else {
            if (l2_decay) SGD_CALL(SGD_LATER, 0, 1); else SGD_CALL(SGD_LATER, 0, 0);
        }
    }
#undef SGD_CALL
}

static void sgd_baseline(float *restrict param, const float *restrict grad, float *restrict buf,
                         size_t n, const sgd_scalars *s, int mode, int nesterov, int l2_decay)
{
    sgd_select(param, grad, buf, n, s, mode, nesterov, l2_decay);
}

#if FO_HAVE_X86_64_V3
FO_TARGET_X86_64_V3
static void sgd_x86_64_v3(float *restrict param, const float *restrict grad, float *restrict buf,
                          size_t n, const sgd_scalars *s, int mode, int nesterov, int l2_decay)
{
    sgd_select(param, grad, buf, n, s, mode, nesterov, l2_decay);
}
#endif

void fo_sgd(fo_isa isa, float *restrict param, const float *restrict grad,
            float *restrict momentum_buffer, size_t n, const fo_sgd_hparams *hp)
{
    sgd_scalars s;
    s.neg_lr = fo_f32(-hp->lr);
    s.weight_decay = fo_f32(hp->weight_decay);
    s.momentum = fo_f32(hp->momentum);
    s.one_minus_dampening = fo_f32(1.0 - hp->dampening);
    s.sign = hp->maximize ? -1.0f : 1.0f;
    const int mode = hp->momentum == 0.0 ? SGD_PLAIN : (hp->first_step ? SGD_FIRST : SGD_LATER);
    const int l2_decay = hp->weight_decay != 0.0;

#if FO_HAVE_X86_64_V3
    if (isa == FO_ISA_X86_64_V3) {
        sgd_x86_64_v3(param, grad, momentum_buffer, n, &s, mode, hp->nesterov, l2_decay);
        return;
    }
#endif
    (void)isa;
    sgd_baseline(param, grad, momentum_buffer, n, &s, mode, hp->nesterov, l2_decay);
}
