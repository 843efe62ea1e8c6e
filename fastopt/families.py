"""Every optimizer family and public optimizer class, each declared once.

A family here, a kernel in csrc/families/<name>.c and a NumPy twin in fastopt.reference are
all it takes: the classes, `fastopt.functional`, `fastopt.reference`, the argument checks,
state dicts, checkpoints and test tables are built from these declarations.  The math of each
family is written out in its C file and in its class docstring (`doc`).
"""
from typing import Dict

from fastopt._family import (NONNEG, POSITIVE, UNIT, UNIT_OPEN, Buffer, Family, Field,
                             OptimizerSpec, f32)

FAMILIES: Dict[str, Family] = {}
OPTIMIZERS: Dict[str, OptimizerSpec] = {}


def family(**kw):
    fam = Family(**kw)
    FAMILIES[fam.name] = fam
    return fam


def optimizer(**kw):
    spec = OptimizerSpec(**kw)
    OPTIMIZERS[spec.name] = spec
    return spec


_FUSED = "`foreach` and `fused` are accepted and ignored: every step is fused."


# ---- SGD --------------------------------------------------------------------------------

def _sgd_check(f, prefix):
    if f["nesterov"] and (f["momentum"] <= 0.0 or f["dampening"] != 0.0):
        raise ValueError(f"{prefix}nesterov requires a momentum > 0 and zero dampening, got "
                         f"momentum={f['momentum']!r}, dampening={f['dampening']!r}")


SGD_FAMILY = family(
    name="sgd",
    fields=(Field("lr", 1e-3, NONNEG), Field("momentum", 0.0, NONNEG),
            Field("dampening", 0.0, UNIT), Field("weight_decay", 0.0, NONNEG),
            Field.flag("nesterov"), Field.flag("maximize"), Field.flag("first_step")),
    buffers=(Buffer("momentum_buffer", optional=True, when="momentum != 0"),),
    needs=lambda f: ("momentum_buffer",) if f["momentum"] != 0.0 else (),
    check=_sgd_check,
    derived=("first_step",),
    # torch sets the momentum buffer to the gradient on the step that creates it
    per_step=lambda f, step, fresh, counters: {"first_step": "momentum_buffer" in fresh},
    has_step=False,
    torch="fused",
)

optimizer(
    name="SGD", family=SGD_FAMILY,
    signature=("lr", "momentum", "dampening", "weight_decay", "nesterov", "*", "maximize",
               "foreach", "differentiable", "fused"),
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, foreach=None, differentiable=False, fused=None),
    doc=f"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

    torch.optim.SGD's arguments, defaults and per-element math (its fused=True kernel, bitwise
    outside torch's per-tensor scalar tail): with g the gradient (negated when maximize),
        g += weight_decay * p
        buf = g on the first step with momentum, then buf = momentum*buf + (1-dampening)*g
        g = g + momentum*buf if nesterov else buf
        p -= lr * g
    {_FUSED}  As in torch, a momentum raised from 0 mid-run starts its buffer from the
    gradient on that step.
    """)


# ---- Adam, AdamW ----------------------------------------------------------------------------

ADAM_FAMILY = family(
    name="adam",
    fields=(Field("lr", 1e-3, NONNEG), Field("beta1", 0.9, UNIT_OPEN),
            Field("beta2", 0.999, UNIT_OPEN), Field("eps", 1e-8, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field.flag("decoupled"),
            Field.flag("amsgrad"), Field.flag("maximize")),
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", signed=False), Buffer("max_exp_avg_sq", when="amsgrad=True", signed=False)),
    needs=lambda f: ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if f["amsgrad"] else ()),
    torch="fused",
)

_ADAM_MATH = """with g the gradient (negated when maximize),
        g += weight_decay * p           (Adam)   or   p *= 1 - lr*weight_decay   (AdamW)
        m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;  amsgrad: vmax = max(vmax, v)
        p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)"""

optimizer(
    name="Adam", family=ADAM_FAMILY,
    signature=("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "foreach", "maximize",
               "capturable", "differentiable", "fused", "decoupled_weight_decay"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                  foreach=None, maximize=False, capturable=False, differentiable=False,
                  fused=None, decoupled_weight_decay=False),
    keys={"betas": ("beta1", "beta2"), "decoupled_weight_decay": "decoupled"},
    doc=f"""Adam (and, with decoupled_weight_decay=True, AdamW), with amsgrad and maximize.

    torch.optim.Adam's arguments, defaults and per-element math (its fused=True kernel, bitwise
    outside torch's per-tensor scalar tail): {_ADAM_MATH}
    {_FUSED}  The state dict keeps 'step' as an int, where torch keeps a float tensor.
    """)

optimizer(
    name="AdamW", family=ADAM_FAMILY,
    signature=("lr", "betas", "eps", "weight_decay", "amsgrad", "*", "maximize", "foreach",
               "capturable", "differentiable", "fused"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False, foreach=None, capturable=False, differentiable=False,
                  fused=None),
    keys={"betas": ("beta1", "beta2"), "decoupled_weight_decay": "decoupled"},
    fixed={"decoupled_weight_decay": True},
    doc=f"""AdamW: Adam with decoupled weight decay (p *= 1 - lr*weight_decay), torch's
    defaults (weight_decay=1e-2).

    torch.optim.AdamW's arguments, defaults and per-element math (its fused=True kernel,
    bitwise outside torch's per-tensor scalar tail): {_ADAM_MATH}
    {_FUSED}  The state dict keeps 'step' as an int, where torch keeps a float tensor.
    """)


# ---- RMSprop --------------------------------------------------------------------------------

RMSPROP_FAMILY = family(
    name="rmsprop",
    fields=(Field("lr", 1e-2, NONNEG), Field("alpha", 0.99, UNIT), Field("eps", 1e-8, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field("momentum", 0.0, NONNEG),
            Field.flag("centered"), Field.flag("maximize")),
    buffers=(Buffer("square_avg", signed=False), Buffer("momentum_buffer", when="momentum > 0"),
             Buffer("grad_avg", when="centered=True")),
    needs=lambda f: (("square_avg",) + (("momentum_buffer",) if f["momentum"] > 0.0 else ())
                     + (("grad_avg",) if f["centered"] else ())),
    torch="single",
    # sa - ga*ga cancels: its two terms are nearly equal where the gradient is steady, and
    # bfloat16 or int8 rounding of either makes it negative, the sqrt NaN and (int8) the
    # whole block NaN (measured: params NaN after two steps of int8 state).  bitsandbytes'
    # 8-bit RMSprop refuses centered too.
    exact_state=lambda f: ("centered RMSprop takes sqrt(square_avg - grad_avg**2), which "
                           "compressed state rounds below 0 (NaN)") if f["centered"] else None,
)

optimizer(
    name="RMSprop", family=RMSPROP_FAMILY,
    signature=("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable",
               "foreach", "maximize", "differentiable"),
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, capturable=False, foreach=None, maximize=False,
                  differentiable=False),
    doc="""RMSprop, plain or centered, with momentum, weight decay and maximize.

    torch.optim.RMSprop's arguments, defaults and per-element math (to a few ulp: torch's loop
    uses an approximate vectorized sqrt): with g the gradient (negated when maximize),
        g += weight_decay * p;   sa = alpha*sa + (1-alpha)*g*g
        centered: ga = lerp(ga, g, 1-alpha);  avg = sqrt(sa - ga*ga) + eps,  else sqrt(sa) + eps
        momentum > 0: buf = momentum*buf + g/avg;  p -= lr*buf     else p -= lr*g/avg
    `foreach` is accepted and ignored.  A momentum raised from 0 (or centered switched on)
    mid-run starts its buffer at zero, as torch's would have been.
    """)


# ---- Adamax ---------------------------------------------------------------------------------

ADAMAX_FAMILY = family(
    name="adamax",
    fields=(Field("lr", 2e-3, NONNEG), Field("beta1", 0.9, UNIT_OPEN),
            Field("beta2", 0.999, UNIT_OPEN), Field("eps", 1e-8, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field.flag("maximize")),
    buffers=(Buffer("exp_avg"), Buffer("exp_inf", signed=False)),
    needs=lambda f: ("exp_avg", "exp_inf"),
    torch="single",
)

optimizer(
    name="Adamax", family=ADAMAX_FAMILY,
    signature=("lr", "betas", "eps", "weight_decay", "foreach", "*", "maximize",
               "differentiable", "capturable"),
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=None,
                  maximize=False, differentiable=False, capturable=False),
    keys={"betas": ("beta1", "beta2")},
    doc="""Adamax: Adam with the infinity norm in place of the second moment, with weight decay
    and maximize.

    torch.optim.Adamax's arguments, defaults and per-element math (its foreach=False loop,
    bitwise): with g the gradient (negated when maximize),
        g += weight_decay * p
        m = lerp(m, g, 1-beta1);  u = max(beta2*u, |g| + eps)     (NaN propagates)
        p -= lr/(1-beta1^t) * m / u
    `foreach` is accepted and ignored.  eps must be > 0 (torch accepts 0, which divides 0 by 0
    where a gradient has always been zero).  The state dict keeps 'step' as an int, where torch
    keeps a float tensor.
    """)


# ---- Adadelta -------------------------------------------------------------------------------

ADADELTA_FAMILY = family(
    name="adadelta",
    fields=(Field("lr", 1.0, NONNEG), Field("rho", 0.9, UNIT), Field("eps", 1e-6, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field.flag("maximize")),
    buffers=(Buffer("square_avg", signed=False), Buffer("acc_delta", signed=False)),
    needs=lambda f: ("square_avg", "acc_delta"),
    torch="single",
)

optimizer(
    name="Adadelta", family=ADADELTA_FAMILY,
    signature=("lr", "rho", "eps", "weight_decay", "foreach", "*", "capturable", "maximize",
               "differentiable"),
    defaults=dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, foreach=None, capturable=False,
                  maximize=False, differentiable=False),
    doc="""Adadelta, with weight decay and maximize.

    torch.optim.Adadelta's arguments, defaults and per-element math (its foreach=False loop, to
    a few ulp: torch's sqrt is MKL's, which is not correctly rounded; ours is IEEE): with g the
    gradient (negated when maximize),
        g += weight_decay * p;   sa = rho*sa + (1-rho)*g*g
        delta = sqrt(ad + eps) / sqrt(sa + eps) * g;   ad = rho*ad + (1-rho)*delta*delta
        p -= lr * delta
    `foreach` is accepted and ignored.  eps must be > 0 (torch accepts 0, which makes every
    delta 0, or 0/0 where sa is 0).  The state dict keeps 'step' as an int, where torch keeps
    a float tensor; as in torch, the step count is kept but unused.
    """)


# ---- NAdam ----------------------------------------------------------------------------------

def _nadam_mu_product(f, step, fresh, counters):
    """The group's mu_product after this step, as torch's float32 0-dim tensor gets it
    (`mu_product *= mu`: both factors rounded to float32, the product rounded once)."""
    mu = f["beta1"] * (1.0 - 0.5 * 0.96 ** (step * f["momentum_decay"]))
    return {"mu_product": f32(f32(counters["mu_product"]) * f32(mu))}


NADAM_FAMILY = family(
    name="nadam",
    fields=(Field("lr", 2e-3, NONNEG), Field("beta1", 0.9, UNIT_OPEN),
            Field("beta2", 0.999, UNIT_OPEN), Field("eps", 1e-8, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field("momentum_decay", 4e-3, NONNEG),
            Field.flag("decoupled"), Field.flag("maximize"),
            Field("mu_product", 1.0, NONNEG)),
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", signed=False)),
    needs=lambda f: ("exp_avg", "exp_avg_sq"),
    derived=("mu_product",),
    per_step=_nadam_mu_product,
    counters=(("mu_product", 1.0),),
    torch="single",
)

optimizer(
    name="NAdam", family=NADAM_FAMILY,
    signature=("lr", "betas", "eps", "weight_decay", "momentum_decay",
               "decoupled_weight_decay", "*", "foreach", "maximize", "capturable",
               "differentiable"),
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3, decoupled_weight_decay=False, foreach=None,
                  maximize=False, capturable=False, differentiable=False),
    keys={"betas": ("beta1", "beta2"), "decoupled_weight_decay": "decoupled"},
    doc="""NAdam (Adam with Nesterov momentum; with decoupled_weight_decay=True, NAdamW).

    torch.optim.NAdam's arguments, defaults and per-element math (its foreach=False loop, to a
    few ulp: torch's sqrt is MKL's, which is not correctly rounded), with g the gradient
    (negated when maximize) and t the step:
        g += weight_decay * p     or, decoupled,     p *= 1 - lr*weight_decay
        mu_t = beta1 * (1 - 0.5 * 0.96^(t*momentum_decay));  mu_product *= mu_t (float32)
        m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g
        denom = sqrt(v / (1-beta2^t)) + eps
        p += -lr*(1-mu_t)/(1-mu_product) * g/denom
        p += -lr*mu_{t+1}/(1-mu_product*mu_{t+1}) * m/denom
    `foreach` is accepted and ignored.  mu_product is kept per param group (every param of a
    group has the same one); the state dict shows it on each param as a float, where torch
    keeps a float32 tensor, and 'step' as an int.
    """)


# ---- RAdam ----------------------------------------------------------------------------------

RADAM_FAMILY = family(
    name="radam",
    fields=(Field("lr", 1e-3, NONNEG), Field("beta1", 0.9, UNIT_OPEN),
            Field("beta2", 0.999, UNIT_OPEN), Field("eps", 1e-8, POSITIVE),
            Field("weight_decay", 0.0, NONNEG), Field.flag("decoupled"),
            Field.flag("maximize")),
    buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", signed=False)),
    needs=lambda f: ("exp_avg", "exp_avg_sq"),
    torch="single",
)

optimizer(
    name="RAdam", family=RADAM_FAMILY,
    signature=("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "*", "foreach",
               "maximize", "capturable", "differentiable"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, foreach=None, maximize=False,
                  capturable=False, differentiable=False),
    keys={"betas": ("beta1", "beta2"), "decoupled_weight_decay": "decoupled"},
    doc="""RAdam, rectified Adam (with decoupled_weight_decay=True, RAdamW).

    torch.optim.RAdam's arguments, defaults and per-element math (its foreach=False loop, to a
    few ulp: torch's sqrt is MKL's, which is not correctly rounded), with g the gradient
    (negated when maximize) and t the step:
        g += weight_decay * p     or, decoupled,     p *= 1 - lr*weight_decay
        m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;  mhat = m / (1-beta1^t)
        rho_inf = 2/(1-beta2) - 1;  rho_t = rho_inf - 2*t*beta2^t/(1-beta2^t)
        rho_t > 5:  rect = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t))
                    p -= lr * mhat * sqrt(1-beta2^t)/(sqrt(v) + eps) * rect
        otherwise:  p -= lr * mhat
    (with betas (0.9, 0.999) the first five steps are unrectified).  `foreach` is accepted and
    ignored.  The state dict keeps 'step' as an int, where torch keeps a float tensor.
    """)


# ---- Adagrad --------------------------------------------------------------------------------

ADAGRAD_FAMILY = family(
    name="adagrad",
    fields=(Field("lr", 1e-2, NONNEG), Field("lr_decay", 0.0, NONNEG),
            Field("weight_decay", 0.0, NONNEG), Field("eps", 1e-10, NONNEG),
            Field.flag("maximize")),
    # torch fills it with initial_accumulator_value (a group key, not a kernel field)
    buffers=(Buffer("sum", init=lambda f: f["initial_accumulator_value"], signed=False),),
    needs=lambda f: ("sum",),
    torch="fused",
)

optimizer(
    name="Adagrad", family=ADAGRAD_FAMILY,
    signature=("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach",
               "*", "maximize", "differentiable", "fused"),
    defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                  eps=1e-10, foreach=None, maximize=False, differentiable=False, fused=None),
    extra=(Field("initial_accumulator_value", 0.0, NONNEG),),
    doc=f"""Adagrad with learning-rate decay, weight decay and maximize.

    torch.optim.Adagrad's arguments, defaults and per-element math (its fused=True kernel,
    bitwise): with g the gradient (negated when maximize) and t the step being taken,
        g += weight_decay * p
        sum += g*g                      (sum starts at initial_accumulator_value)
        p -= lr / (1 + (t-1)*lr_decay) * g / (sqrt(sum) + eps)
    {_FUSED}
    torch creates the state ('step' and 'sum') in the constructor; here the first step
    creates it, as for the other optimizers, so `state` and `state_dict()` have no entry for
    a parameter before its group has stepped.  A param group's own initial_accumulator_value
    starts its 'sum' (torch fills every 'sum' with the constructor's value and ignores the
    group's).  The state dict keeps 'step' as an int, where torch keeps a float tensor.
    """)


# ---- Lion -----------------------------------------------------------------------------------

LION_FAMILY = family(
    name="lion",
    fields=(Field("lr", 1e-4, NONNEG), Field("beta1", 0.9, UNIT_OPEN),
            Field("beta2", 0.99, UNIT_OPEN), Field("weight_decay", 0.0, NONNEG),
            Field.flag("maximize")),
    buffers=(Buffer("exp_avg"),),
    needs=lambda f: ("exp_avg",),
    torch=None,     # torch.optim has no Lion: the tests check it against the paper's formula
)

optimizer(
    name="Lion", family=LION_FAMILY,
    signature=("lr", "betas", "weight_decay", "*", "maximize"),
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    keys={"betas": ("beta1", "beta2")},
    doc="""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    torch has no Lion: the arguments, defaults and math are those of the paper's PyTorch
    reference (google/automl, lion/lion_pytorch.py), with every rounding as torch rounds its
    operations in float32: with g the gradient (negated when maximize),
        p *= 1 - lr*weight_decay
        p -= lr * sign(beta1*m + (1-beta1)*g)
        m = beta2*m + (1-beta2)*g
    sign(0) is 0, as torch.sign; sign(NaN) is NaN, where torch.sign gives 0: a NaN gradient
    makes the param NaN, where the reference would silently freeze it (its m stays NaN, so
    every later sign is 0).
    maximize is an addition (the reference has none).  weight_decay must be >= 0 (the
    reference does not check it).  The state keeps 'step', which the math does not use.
    """)
