"""Numpy schedulers vs diffusers, step by step, with the same model outputs and variance noises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from diffusers import DDPMScheduler as TorchDDPM

from eclipse_export.families.kandinsky22.presets import SCHEDULER_KANDINSKY22
from eclipse_export.runtime.schedulers import (
    SCHEDULER_KINDS,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerConfigError,
    apply_step,
    scheduler_from_config,
)
from eclipse_export.verify.torch_noise import inject_ddpm_variance_noise

# the decoder's scheduler_config.json (first revision; a later one sets clip_sample true, hence
# both are tested): the preset's copy, so the two cannot drift apart
KANDINSKY22 = SCHEDULER_KANDINSKY22
SHAPE = (2, 4, 8, 8)
TORCH_CLASSES = {"ddpm": TorchDDPM, "ddim": TorchDDIM}


def _config(**overrides):
    return {**KANDINSKY22, **overrides}


def _side_by_side(config: dict, kind: str, steps: int, seed: int = 0) -> float:
    """Step both schedulers through the whole schedule, feeding both diffusers' sample, the same
    model output and the same variance noise at every step; returns the worst difference of
    prev_sample relative to the sample's magnitude (float32 rounding scales with it)."""
    ours = scheduler_from_config(config, kind)
    theirs = TORCH_CLASSES[kind].from_config(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == np.int64
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
    outputs = rng.standard_normal((steps, *SHAPE), dtype=np.float32) * 0.8
    noises = rng.standard_normal((steps, *SHAPE), dtype=np.float32)
    worst = 0.0
    with inject_ddpm_variance_noise(iter(list(noises))):
        for i, t in enumerate(ours.timesteps):
            model_output = torch.from_numpy(outputs[i]) + 0.1 * x  # depends on the sample, as a denoiser's would
            # noise only where diffusers draws it (t > 0), which also checks that t = 0 needs none
            noise = noises[i] if ours.needs_noise and t > 0 else None
            mine = ours.step(model_output.numpy(), int(t), x.numpy(), noise=noise)
            x = theirs.step(model_output, theirs.timesteps[i], x).prev_sample
            assert mine.dtype == np.float32 and mine.shape == SHAPE
            ref = x.numpy()
            assert np.isfinite(ref).all()
            worst = max(worst, float(np.abs(mine - ref).max()) / max(1.0, float(np.abs(ref).max())))
    return worst


def test_kandinsky_50_steps_timesteps():
    for kind in SCHEDULER_KINDS:
        s = scheduler_from_config(KANDINSKY22, kind)
        s.set_timesteps(50)
        assert s.timesteps.dtype == np.int64
        assert s.timesteps.tolist() == list(range(981, 0, -20))  # 981, 961, ..., 21, 1


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 100])
@pytest.mark.parametrize("clip", [False, True])
def test_kandinsky_config_step_by_step(kind, steps, clip):
    assert _side_by_side(_config(clip_sample=clip), kind, steps, seed=steps) <= 1e-6


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 50])
def test_other_spacings_step_by_step(kind, spacing, steps):
    assert _side_by_side(_config(clip_sample=True, timestep_spacing=spacing), kind, steps) <= 1e-6


@pytest.mark.parametrize("kind, spacing", [("ddpm", "linspace"), ("ddim", "trailing")])
def test_1000_steps(kind, spacing):
    # linspace ends at t = 0, where DDPM draws no variance noise
    assert _side_by_side(_config(timestep_spacing=spacing), kind, 1000) <= 1e-6


def test_1000_leading_steps_with_offset_are_refused():
    # leading spacing + steps_offset 1 reaches timestep 1000: diffusers fails mid-loop, we up front
    theirs = TorchDDPM.from_config(KANDINSKY22)
    theirs.set_timesteps(1000)
    assert int(theirs.timesteps[0]) == 1000
    with pytest.raises(IndexError):
        theirs.step(torch.zeros(SHAPE), theirs.timesteps[0], torch.zeros(SHAPE))
    for kind in SCHEDULER_KINDS:
        with pytest.raises(SchedulerConfigError, match="outside 0..999"):
            scheduler_from_config(KANDINSKY22, kind).set_timesteps(1000)
        scheduler_from_config(KANDINSKY22, kind).set_timesteps(999)  # the largest that works


def test_trailing_step_counts_that_diffusers_gets_wrong_are_refused():
    # float arange: 61 trailing steps come out as 62, the last one -1
    theirs = TorchDDPM.from_config(_config(timestep_spacing="trailing"))
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    with pytest.raises(SchedulerConfigError, match="trailing"):
        scheduler_from_config(_config(timestep_spacing="trailing")).set_timesteps(61)


VARIANTS = [
    ("ddpm", dict(variance_type="fixed_small_log")),
    ("ddpm", dict(variance_type="fixed_large")),  # large variance on the last step too
    ("ddpm", dict(prediction_type="v_prediction", clip_sample=True)),
    ("ddim", dict(prediction_type="v_prediction", clip_sample=True)),
    ("ddpm", dict(prediction_type="sample")),
    ("ddim", dict(prediction_type="sample", clip_sample=True)),
    ("ddim", dict(set_alpha_to_one=True)),
    ("ddpm", dict(beta_schedule="scaled_linear")),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)),
    ("ddpm", dict(trained_betas=np.linspace(1e-4, 2e-2, 1000).tolist())),
    ("ddpm", dict(num_train_timesteps=999, timestep_spacing="linspace")),
    ("ddpm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("ddim", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("ddpm", dict(clip_sample_range=0.5, clip_sample=True, some_future_key=3)),
]


@pytest.mark.parametrize("kind, overrides", VARIANTS, ids=[f"{k}-{'-'.join(o)}" for k, o in VARIANTS])
def test_config_variants_step_by_step(kind, overrides):
    assert _side_by_side(_config(**overrides), kind, 7) <= 1e-6


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_missing_keys_take_diffusers_defaults(kind):
    # notably clip_sample defaults to True and steps_offset to 0
    config = {"_class_name": "DDPMScheduler"}
    assert _side_by_side(config, kind, 7) <= 1e-6
    s = scheduler_from_config(config, kind)
    s.set_timesteps(10)
    assert s.timesteps[-1] == 0


def test_ddpm_requires_the_variance_noise():
    s = scheduler_from_config(KANDINSKY22)
    s.set_timesteps(2)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="variance noise"):
        s.step(x, int(s.timesteps[0]), x)
    # the last step (t = 1) still needs it: diffusers draws noise whenever t > 0
    with pytest.raises(ValueError, match="variance noise"):
        s.step(x, int(s.timesteps[-1]), x)
    with pytest.raises(ValueError, match="shape"):
        s.step(x, int(s.timesteps[0]), x, noise=np.zeros((1, 4, 2, 3), np.float32))
    with pytest.raises(ValueError, match="not in this schedule"):
        s.step(x, 500, x, noise=x)


def test_ddim_ignores_noise():
    s = scheduler_from_config(KANDINSKY22, "ddim")
    s.set_timesteps(5)
    rng = np.random.default_rng(0)
    x, eps, noise = rng.standard_normal((3, 1, 4, 4, 4), dtype=np.float32)
    t = int(s.timesteps[0])
    assert not s.needs_noise
    np.testing.assert_array_equal(s.step(eps, t, x), s.step(eps, t, x, noise=noise))


@pytest.mark.parametrize("overrides, message", [
    (dict(thresholding=True), "thresholding=True"),
    (dict(variance_type="learned_range"), "variance_type='learned_range'"),
    (dict(variance_type="learned"), "variance_type='learned'"),
    (dict(variance_type="fixed_large_log"), "variance_type='fixed_large_log'"),
    (dict(beta_schedule="laplace"), "beta_schedule='laplace'"),
    (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
    (dict(timestep_spacing="karras"), "timestep_spacing='karras'"),
    (dict(prediction_type="flow"), "prediction_type='flow'"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(_class_name="EulerDiscreteScheduler"), "_class_name='EulerDiscreteScheduler'"),
])
def test_unsupported_configs(overrides, message):
    with pytest.raises(SchedulerConfigError, match=message) as e:
        scheduler_from_config(_config(**overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, "50"])
def test_step_count_bounds(steps):
    for kind in SCHEDULER_KINDS:
        with pytest.raises(SchedulerConfigError, match="steps must be"):
            scheduler_from_config(KANDINSKY22, kind).set_timesteps(steps)


def test_kinds_and_round_trip():
    assert isinstance(scheduler_from_config(KANDINSKY22), DDPMScheduler)
    ddim = scheduler_from_config(KANDINSKY22, "ddim")  # a DDPM config drives DDIM, as in diffusers
    assert isinstance(ddim, DDIMScheduler)
    assert isinstance(scheduler_from_config(ddim.to_config()), DDIMScheduler)
    assert isinstance(DDPMScheduler.from_config(KANDINSKY22), DDPMScheduler)
    assert DDPMScheduler.init_noise_sigma == DDIMScheduler.init_noise_sigma == 1.0
    with pytest.raises(SchedulerConfigError, match="unknown scheduler kind 'euler'"):
        scheduler_from_config(KANDINSKY22, "euler")


def test_runtime_module_imports_no_torch():
    code = "import sys, eclipse_export.runtime.schedulers; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


EPSILON_VARIANTS = [
    ("ddpm", {}), ("ddim", {}), ("ddpm", dict(clip_sample=True)), ("ddim", dict(clip_sample=True, clip_sample_range=0.5)),
    ("ddpm", dict(variance_type="fixed_large")), ("ddpm", dict(variance_type="fixed_small_log")),
    ("ddim", dict(set_alpha_to_one=False, timestep_spacing="trailing")),
]


@pytest.mark.parametrize("kind, overrides", EPSILON_VARIANTS, ids=[f"{k}-{'-'.join(o)}" for k, o in EPSILON_VARIANTS])
@pytest.mark.parametrize("steps", [1, 4, 50])
def test_device_step_coefficients_match_step(kind, overrides, steps):
    """The GPU backend runs each step as one fused kernel from StepCoefficients; apply_step is
    that kernel in numpy. It must give what step gives, for every step of the schedule."""
    sched = scheduler_from_config(_config(**overrides), kind)
    sched.set_timesteps(steps)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    worst = 0.0
    for t in sched.timesteps:
        eps = (rng.standard_normal(SHAPE, dtype=np.float32) * 0.8 + 0.1 * x).astype(np.float32)
        noise = rng.standard_normal(SHAPE, dtype=np.float32) if sched.needs_noise and t > 0 else None
        k = sched.step_coefficients(int(t))
        if noise is None:
            assert k.std == 0.0
        mine = apply_step(k, eps, x, noise)
        ref = sched.step(eps, int(t), x, noise=noise)
        worst = max(worst, float(np.abs(mine - ref).max()) / max(1.0, float(np.abs(ref).max())))
        x = ref
    assert worst <= 1e-6


def test_device_step_refuses_other_predictions():
    sched = scheduler_from_config(_config(prediction_type="v_prediction"), "ddpm")
    sched.set_timesteps(4)
    with pytest.raises(SchedulerConfigError, match="epsilon only"):
        sched.step_coefficients(int(sched.timesteps[0]))
