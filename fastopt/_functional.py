"""The functional API, built from the family declarations for a backend (fastopt._core or
the NumPy reference).

Both backends get the same signatures, the same checks and the same messages; only the kernel
they end in differs.  `<family>_(param, grad, <state buffers>, *, step, <hyperparameters>,
grad_multiplier=1.0, zero_grad=False)`: the buffers in the family's order (those that only
some options use default to None), the hyperparameters as the kernel names them, with their
defaults.  Beyond torch's arguments, every kernel takes grad_multiplier (the gradient is
multiplied by it first, in the same pass: a clipping coefficient or 1/loss_scale; exactly 1
changes nothing) and zero_grad (write zeros into the gradient in the same pass that reads it;
the gradient must then be writeable).
"""
from fastopt import _validate as V


def make(backend, fam):
    """-> fam's functional entry point on `backend` (a function with an exact signature)."""
    defaults = {f.name: f.default for f in fam.user_fields}
    always = fam.required(fam.check_fields(defaults))
    bufs = [b.name for b in fam.buffers]
    optional_seen = False
    parts = ["param", "grad"]
    for b in bufs:
        if b in always:
            assert not optional_seen, f"{fam.name}: buffers used always must come first"
            parts.append(b)
        else:
            optional_seen = True
            parts.append(f"{b}=None")
    parts.append("*")
    parts.append("step")
    parts += [f"{f.name}=_defaults[{f.name!r}]" for f in fam.user_fields]
    # a family's counters (NAdam's mu_product): their values before this step
    parts += [f"{c}=_counters[{c!r}]" for c in fam.counter_defaults]
    parts += ["grad_multiplier=1.0", "zero_grad=False"]
    name = fam.name + "_"
    # each field's check is called straight from the generated code (the per-call cost
    # matters at small sizes), then the checks across fields
    checks = ", ".join(f"{f.name!r}: _check[{k}]({f.name!r}, {f.name})"
                       for k, f in enumerate(fam.user_fields))
    src = (f"def {name}({', '.join(parts)}):\n"
           f"    fields = {{{checks}}}\n"
           + ("    _across(fields, '')\n" if fam.check is not None else "")
           + f"    return _call(param, grad, ({', '.join(bufs)},), step, fields, "
           f"{{{', '.join(f'{c!r}: {c}' for c in fam.counter_defaults)}}}, "
           "grad_multiplier, zero_grad)\n")
    when = {b.name: b.when or None for b in fam.buffers}     # None: every step uses it
    kernel, family, per_step = backend.kernel, fam.name, fam.per_step
    why = {}      # buffers used -> why each is required (for messages)

    def _call(param, grad, state, step, fields, counters, grad_multiplier, zero_grad):
        for c in counters:
            counters[c] = V.real(c, counters[c])
        step = V.step(step)
        if grad_multiplier != 1.0 or zero_grad is not False:
            grad_multiplier, zero_grad = V.grad_options(grad_multiplier, zero_grad)
        used = fam.needs(fields)
        required = why.get(used)
        if required is None:
            required = why[used] = {b: when[b] for b in used}
        n = V.buffers([("param", param, True), ("grad", grad, zero_grad)]
                      + [(b, a, b in used) for b, a in zip(bufs, state)], required)
        if per_step is not None:
            # the functional count starts every buffer on step 1 (SGD's first momentum step)
            fields.update(per_step(fields, step, bufs if step == 1 else (), counters))
        kernel(family, param, grad, [a if b in used else None for b, a in zip(bufs, state)],
               0, n, step, fields, grad_multiplier, zero_grad)
        if counters:
            return {c: fields[c] for c in counters}

    namespace = {"_call": _call, "_defaults": defaults, "_counters": fam.counter_defaults,
                 "_check": [f.check for f in fam.user_fields], "_across": fam.check}
    exec(src, namespace)
    fn = namespace[name]
    fn.__doc__ = (f"One in-place {fam.name} step on 1-D C-contiguous float32 arrays of one "
                  "length (see the class of the same family for the math); the state buffers "
                  "are updated in place, grad is only read (unless zero_grad=True). step: the "
                  "1-based count of the step being taken.  Returns None"
                  + (f"; with {', '.join(fam.counter_defaults)} (the value before this step, "
                     "as the state keeps it), returns their values after it, as a dict."
                     if fam.counter_defaults else "."))
    return fn
