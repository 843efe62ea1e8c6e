"""The functional API, built once per backend (fastopt._core or the NumPy reference).

Both backends get the same signatures, the same checks and the same messages; only the range
kernel they end in differs.  Beyond torch's arguments, every kernel takes grad_multiplier (the
gradient is multiplied by it first, in the same pass: a clipping coefficient or 1/loss_scale;
exactly 1 changes nothing) and zero_grad (write zeros into the gradient in the same pass that
reads it; the gradient must then be writeable).
"""
from fastopt import _validate as V


def make(backend):
    """-> (sgd_, adam_, rmsprop_) calling `backend`'s range kernels."""

    def sgd_(param, grad, momentum_buffer=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, grad_multiplier=1.0,
             zero_grad=False):
        """One in-place SGD step (torch.optim.SGD's math; see fastopt.SGD).

        param, grad, momentum_buffer: 1-D C-contiguous float32 arrays of one length; param and
        momentum_buffer are updated in place (grad may be read-only), and the buffer is needed
        when momentum != 0.  step: the 1-based count of this step; on step 1 the momentum
        buffer is set to the gradient (torch's first step), whatever it held.  Returns None.
        """
        hp = V.sgd_hparams(lr, momentum, dampening, weight_decay, nesterov, maximize)
        step = V.step(step)
        gm, zg = V.grad_options(grad_multiplier, zero_grad)
        uses_buf = hp[1] != 0.0
        n = V.buffers([("param", param, True), ("grad", grad, zg),
                       ("momentum_buffer", momentum_buffer, uses_buf)],
                      {"momentum_buffer": "momentum != 0"} if uses_buf else {})
        backend.sgd(param, grad, momentum_buffer if uses_buf else None, 0, n, *hp, step == 1,
                    gm, zg)

    def adam_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
              amsgrad=False, maximize=False, grad_multiplier=1.0, zero_grad=False):
        """One in-place Adam step; decoupled=True is AdamW (see fastopt.Adam for the math).

        All arrays: 1-D C-contiguous float32 of one length; all but grad are updated in place
        (grad may be read-only); max_exp_avg_sq is needed when amsgrad=True.  step: the
        1-based count of this step (the bias corrections use it).  Returns None.
        """
        hp = V.adam_hparams(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize)
        step = V.step(step)
        gm, zg = V.grad_options(grad_multiplier, zero_grad)
        amsgrad = hp[6]
        n = V.buffers([("param", param, True), ("grad", grad, zg), ("exp_avg", exp_avg, True),
                       ("exp_avg_sq", exp_avg_sq, True),
                       ("max_exp_avg_sq", max_exp_avg_sq, amsgrad)],
                      {"max_exp_avg_sq": "amsgrad=True"} if amsgrad else {})
        backend.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None,
                     0, n, step, *hp, gm, zg)

    def rmsprop_(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, step,
                 lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False, grad_multiplier=1.0, zero_grad=False):
        """One in-place RMSprop step (torch.optim.RMSprop's math; see fastopt.RMSprop).

        All arrays: 1-D C-contiguous float32 of one length; all but grad are updated in place
        (grad may be read-only); momentum_buffer is needed when momentum > 0 and grad_avg when
        centered=True.  step: the 1-based count of this step (checked; RMSprop's math does not
        use it).  Returns None.
        """
        hp = V.rmsprop_hparams(lr, alpha, eps, weight_decay, momentum, centered, maximize)
        V.step(step)
        gm, zg = V.grad_options(grad_multiplier, zero_grad)
        uses_buf, centered = hp[4] > 0.0, hp[5]
        required = {}
        if uses_buf:
            required["momentum_buffer"] = "momentum > 0"
        if centered:
            required["grad_avg"] = "centered=True"
        n = V.buffers([("param", param, True), ("grad", grad, zg),
                       ("square_avg", square_avg, True),
                       ("momentum_buffer", momentum_buffer, uses_buf),
                       ("grad_avg", grad_avg, centered)], required)
        backend.rmsprop(param, grad, square_avg, momentum_buffer if uses_buf else None,
                        grad_avg if centered else None, 0, n, *hp, gm, zg)

    return sgd_, adam_, rmsprop_
