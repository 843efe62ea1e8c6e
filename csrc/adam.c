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

#include "internal.h"

typedef struct {
    float grad_factor, neg_step_size, bc2_sqrt, eps, weight_decay, decay;
    float beta2, one_minus_beta2;
    float lerp_coeff;   /* w, or w-1 when lerp_from_grad */
    int lerp_from_grad; /* torch's lerp switches formula at w >= 0.5 */
    unsigned modes;     /* ADAM_* bits */
} adam_scalars;

enum { ADAM_AMSGRAD = 1, ADAM_L2 = 2, ADAM_ZERO_GRAD = 4 };

static void adam_prepare(adam_scalars *s, const fo_adam_group *grp)
{
    const fo_adam_hparams *hp = &grp->hp;
    const double bc1 = 1.0 - pow(hp->beta1, (double)hp->step);
    const double bc2 = 1.0 - pow(hp->beta2, (double)hp->step);
    s->grad_factor = fo_grad_factor(&grp->g, hp->maximize);
    s->neg_step_size = fo_f32(-(hp->lr / bc1));
    s->bc2_sqrt = fo_f32(sqrt(bc2));
    s->eps = fo_f32(hp->eps);
    s->weight_decay = fo_f32(hp->weight_decay);
    s->decay = hp->decoupled ? fo_f32(1.0 - hp->lr * hp->weight_decay) : 1.0f;
    s->beta2 = fo_f32(hp->beta2);
    s->one_minus_beta2 = fo_f32(1.0 - hp->beta2);
    const float w = fo_f32(1.0 - hp->beta1);
    s->lerp_from_grad = !(fabsf(w) < 0.5f);
    s->lerp_coeff = s->lerp_from_grad ? w - 1.0f : w;
    s->modes = (hp->amsgrad ? ADAM_AMSGRAD : 0u)
             | (!hp->decoupled && hp->weight_decay != 0.0 ? ADAM_L2 : 0u)
             | (grp->g.zero_grad ? ADAM_ZERO_GRAD : 0u);
}

FO_INLINE void adam_body(float *restrict param, float *restrict grad, float *restrict exp_avg,
                         float *restrict exp_avg_sq, float *restrict max_exp_avg_sq, size_t n,
                         const adam_scalars *s, const unsigned modes)
{
    const float grad_factor = s->grad_factor, neg_step_size = s->neg_step_size;
    const float bc2_sqrt = s->bc2_sqrt, eps = s->eps, weight_decay = s->weight_decay;
    const float decay = s->decay, beta2 = s->beta2, one_minus_beta2 = s->one_minus_beta2;
    const float lerp_coeff = s->lerp_coeff;
    const int lerp_from_grad = s->lerp_from_grad;
    for (size_t i = 0; i < n; i++) {
        float g = grad[i] * grad_factor;
        if (modes & ADAM_ZERO_GRAD)
            grad[i] = 0.0f;
        const float p_old = param[i];
        if (modes & ADAM_L2)
            g = fmaf(p_old, weight_decay, g);
        const float m_old = exp_avg[i];
        const float m = fmaf(lerp_coeff, g - m_old, lerp_from_grad ? g : m_old);
        float v = fmaf(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        if (modes & ADAM_AMSGRAD) {
            /* torch's maximum: a NaN in either operand propagates (written as two selects so
             * that the loop stays branch-free and vectorizes) */
            const float vmax = max_exp_avg_sq[i];
            v = vmax > v ? vmax : v;       /* v if v is NaN */
            v = vmax != vmax ? vmax : v;   /* vmax if vmax is NaN */
            max_exp_avg_sq[i] = v;
        }
        const float denom = sqrtf(v) / bc2_sqrt + eps;
        param[i] = p_old * decay + (neg_step_size * m) / denom;   /* decay is 1 unless AdamW */
    }
}

/* One instantiation of the body per combination of modes, each branch-free. */
#define ADAM_SELECT                                                                         \
    switch (s->modes) {                                                                     \
    case 0: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 0); break;              \
    case 1: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 1); break;              \
    case 2: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 2); break;              \
    case 3: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 3); break;              \
    case 4: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 4); break;              \
    case 5: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 5); break;              \
    case 6: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 6); break;              \
    default: adam_body(param, grad, exp_avg, exp_avg_sq, vmax, n, s, 7); break;             \
    }

#define ADAM_ARGS float *restrict param, float *restrict grad, float *restrict exp_avg,      \
                  float *restrict exp_avg_sq, float *restrict vmax, size_t n,               \
                  const adam_scalars *s

static void adam_baseline(ADAM_ARGS) { ADAM_SELECT }
#if FO_HAVE_X86_64
FO_TARGET_X86_64_V3 static void adam_x86_64_v3(ADAM_ARGS) { ADAM_SELECT }
FO_TARGET_X86_64_V4 static void adam_x86_64_v4(ADAM_ARGS) { ADAM_SELECT }
#endif

typedef struct {
    fo_isa isa;
    float *param, *grad, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
} adam_ctx;

static void adam_range(const void *ctx, const void *group, size_t lo, size_t hi)
{
    const adam_ctx *c = ctx;
    adam_scalars s;
    adam_prepare(&s, group);
    float *vmax = (s.modes & ADAM_AMSGRAD) ? c->max_exp_avg_sq + lo : NULL;
    switch (c->isa) {
#if FO_HAVE_X86_64
    case FO_ISA_X86_64_V4:
        adam_x86_64_v4(c->param + lo, c->grad + lo, c->exp_avg + lo, c->exp_avg_sq + lo, vmax,
                       hi - lo, &s);
        return;
    case FO_ISA_X86_64_V3:
        adam_x86_64_v3(c->param + lo, c->grad + lo, c->exp_avg + lo, c->exp_avg_sq + lo, vmax,
                       hi - lo, &s);
        return;
#endif
    default:
        adam_baseline(c->param + lo, c->grad + lo, c->exp_avg + lo, c->exp_avg_sq + lo, vmax,
                      hi - lo, &s);
    }
}

void fo_adam(const fo_exec *ex, float *restrict param, float *restrict grad,
             float *restrict exp_avg, float *restrict exp_avg_sq,
             float *restrict max_exp_avg_sq, const fo_adam_group *groups, size_t ngroups)
{
    const adam_ctx c = {ex->isa, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq};
    fo_run_groups(ex, groups, ngroups, sizeof *groups, adam_range, &c);
}
