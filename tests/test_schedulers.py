"""Numpy schedulers vs diffusers, step by step, with the same model outputs and noises."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from diffusers import DDPMScheduler as TorchDDPM

from eclipse_export.presets import SCHEDULER_KANDINSKY22
from eclipse_export.runtime.schedulers import SchedulerConfigError, scheduler_from_config
from eclipse_export.torch_noise import inject_ddpm_variance_noise


def _config(**overrides):
    return {**SCHEDULER_KANDINSKY22, **overrides}


def test_kandinsky_50_steps_timesteps():
    s = scheduler_from_config(_config())
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 100])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_step_by_step_equal_to_diffusers(kind, steps, clip, spacing):
    config = _config(clip_sample=clip, timestep_spacing=spacing)
    ours = scheduler_from_config(config, kind)
    theirs = (TorchDDPM if kind == "ddpm" else TorchDDIM).from_config(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()

    rng = np.random.default_rng(steps)
    shape = (2, 4, 8, 8)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    outputs = rng.standard_normal((steps, *shape), dtype=np.float32) * 0.8
    noises = rng.standard_normal((steps, *shape), dtype=np.float32)
    worst = 0.0
    with inject_ddpm_variance_noise(iter(list(noises))):
        for i, t in enumerate(ours.timesteps):
            # a model output that depends on the sample, like a denoiser's would
            eps = torch.from_numpy(outputs[i]) + 0.1 * x
            # step by step: both get the same input (diffusers' trajectory) at every step
            mine = ours.step(eps.numpy(), int(t), x.numpy(), noise=noises[i] if ours.needs_noise else None)
            x = theirs.step(eps, theirs.timesteps[i], x).prev_sample
            assert mine.dtype == np.float32
            # float32 rounding scales with magnitude: compare relative to the sample's size
            worst = max(worst, float(np.abs(mine - x.numpy()).max() / max(1.0, np.abs(x.numpy()).max())))
    assert worst <= 1e-6, worst


def test_ddpm_requires_the_variance_noise():
    s = scheduler_from_config(_config())
    s.set_timesteps(2)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="variance noise"):
        s.step(x, int(s.timesteps[0]), x)


@pytest.mark.parametrize("overrides, message", [
    (dict(thresholding=True), "thresholding"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(beta_schedule="laplace"), "beta_schedule"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(_class_name="EulerDiscreteScheduler"), "not supported"),
])
def test_unsupported_configs(overrides, message):
    with pytest.raises(SchedulerConfigError, match=message):
        scheduler_from_config(_config(**overrides))


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_bounds(steps):
    s = scheduler_from_config(_config())
    with pytest.raises(SchedulerConfigError, match="between 1 and 1000"):
        s.set_timesteps(steps)


def test_kind_override_and_unknown_kind():
    assert type(scheduler_from_config(_config(), "ddim")).__name__ == "DDIMScheduler"
    with pytest.raises(SchedulerConfigError, match="unknown scheduler"):
        scheduler_from_config(_config(), "euler")


def test_runtime_module_imports_no_torch():
    code = "import sys, eclipse_export.runtime.schedulers; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
