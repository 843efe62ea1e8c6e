"""The README's promises: its example runs and trains, and CI runs its test command."""
import os
import re

import numpy as np
import pytest

from cases import TORCH_SKIP_REASON, torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(lang):
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = [b.split("#")[0].strip() for b in blocks("sh")[:2]]
    assert commands[0].endswith("python bench/run.py")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == commands[1], "CI must run the README's test command"


def test_recipe_trains_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    code = blocks("python")[1]
    monkeypatch.chdir(tmp_path)
    first = {}
    exec(compile(code, "README.md", "exec"), first)
    assert first["loss"] < 0.02
    assert (tmp_path / "ckpt.npz").exists()
    assert first["sched"].last_epoch == 1000
    assert "skipped steps 0" in capsys.readouterr().out
    # "stop it at any point and run it again": killed at step 600, resumed from step 500
    (tmp_path / "ckpt.npz").unlink()
    killed = code.replace("    sched.step()\n",
                          "    sched.step()\n    if step == 600:\n        raise KeyboardInterrupt\n")
    assert killed != code
    with pytest.raises(KeyboardInterrupt):
        exec(compile(killed, "README.md", "exec"), {})
    resumed = {}
    exec(compile(code, "README.md", "exec"), resumed)
    assert np.array_equal(resumed["opt"].flat_params, first["opt"].flat_params)


def test_training_example_runs_and_learns(capsys):
    code = blocks("python")[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"] < 1e-3
    assert np.shares_memory(namespace["w"], namespace["opt"].flat_params)
    assert "loss" in capsys.readouterr().out


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_torch_example_trains_in_the_arena(capsys):
    """The fastopt.torch section's example: an nn.Module, named_parameters, a torch scheduler,
    opt.zero_grad() in the loop; the model learns and its parameters live in the arena."""
    code = [b for b in blocks("python") if "fastopt.torch" in b]
    assert len(code) == 1
    before = torch.get_num_threads()
    # one thread: on a shared 2-core machine a busy core makes every 2-thread parallel region
    # of the forward and backward wait (the example took 10 s instead of 0.2 s)
    torch.set_num_threads(1)
    try:
        ns = {}
        exec(compile(code[0], "README.md", "exec"), ns)
    finally:
        torch.set_num_threads(before)
    opt, model = ns["opt"], ns["model"]
    assert isinstance(opt, torch.optim.Optimizer)
    assert ns["loss"].item() < 0.05
    assert ns["sched"].last_epoch == 300
    for p in model.parameters():
        assert np.shares_memory(p.detach().numpy(), opt.core.flat_params)
        assert np.shares_memory(p.grad.numpy(), opt.core.flat_grads)
    assert "loss" in capsys.readouterr().out
