"""Numpy DDPM and DDIM schedulers, step-for-step equal to diffusers' (tested within 1e-6).

Configured from a diffusers `scheduler_config.json` dict, which the bundle ships as read from
the checkpoint (clip_sample differs between revisions of Kandinsky 2.2's config). Arithmetic
is float32 throughout, as in diffusers, so both accumulate the same rounding.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULER_KINDS = ("ddpm", "ddim")
_F32 = np.float32


class SchedulerConfigError(ValueError):
    """The scheduler config or request is outside what this runtime implements."""


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: float32 endpoints and step,
    evaluated in double from the nearer end (that is how torch's CPU kernel does it)."""
    if n == 1:
        return np.array([start], dtype=_F32)
    s, e = np.float64(_F32(start)), np.float64(_F32(end))
    step = np.float64((_F32(end) - _F32(start)) / _F32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, s + step * i, e - step * (n - 1 - i)).astype(_F32)


def _betas(config: dict) -> np.ndarray:
    n = int(config.get("num_train_timesteps", 1000))
    schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=_F32)
    if schedule == "linear":
        return _linspace32(start, end, n)
    if schedule == "scaled_linear":
        return _linspace32(start**0.5, end**0.5, n) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=_F32)
    raise SchedulerConfigError(f"beta_schedule {schedule!r} is not supported")


class _Base:
    init_noise_sigma = 1.0
    needs_noise = False

    def __init__(self, config: dict):
        self.config = dict(config)
        for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
            if config.get(key) == bad:
                raise SchedulerConfigError(f"{key}={bad!r} is not supported")
        if config.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
            raise SchedulerConfigError(f"prediction_type {config.get('prediction_type')!r} is not supported")
        if config.get("timestep_spacing", "leading") not in ("leading", "linspace", "trailing"):
            raise SchedulerConfigError(f"timestep_spacing {config.get('timestep_spacing')!r} is not supported")
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        # torch's float32 cumprod accumulates in double; do the same to get identical values
        self.alphas_cumprod = np.cumprod((_F32(1.0) - _betas(config)).astype(np.float64)).astype(_F32)
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].astype(np.int64)
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict):
        return cls(config)

    def to_config(self) -> dict:
        return dict(self.config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, total = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= total:
            raise SchedulerConfigError(f"steps must be between 1 and {total} (the trained timesteps), got {n}")
        spacing = self.config.get("timestep_spacing", "leading")
        offset = int(self.config.get("steps_offset", 0))
        if spacing == "linspace":
            t = np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.int64) + offset
        else:  # trailing
            t = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
        self.timesteps, self.num_inference_steps = t, n

    def _x0(self, model_output, sample, alpha_prod_t):
        beta_prod_t = _F32(1) - alpha_prod_t
        kind = self.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            x0 = (sample - beta_prod_t ** _F32(0.5) * model_output) / alpha_prod_t ** _F32(0.5)
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** _F32(0.5) * x0) / beta_prod_t ** _F32(0.5)
        else:  # v_prediction
            x0 = alpha_prod_t ** _F32(0.5) * sample - beta_prod_t ** _F32(0.5) * model_output
            eps = alpha_prod_t ** _F32(0.5) * model_output + beta_prod_t ** _F32(0.5) * sample
        if self.config.get("clip_sample", False):
            r = _F32(self.config.get("clip_sample_range", 1.0))
            x0 = np.clip(x0, -r, r)
        return x0.astype(_F32), eps.astype(_F32)


class DDPMScheduler(_Base):
    needs_noise = True

    def __init__(self, config: dict):
        super().__init__(config)
        variance = config.get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise SchedulerConfigError(f"variance_type {variance!r} is not supported (the UNet graph has no variance output)")

    def _prev(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        idx = int(np.nonzero(self.timesteps == t)[0][0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        t = int(timestep)
        prev_t = self._prev(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else _F32(1.0)
        beta_prod_t, beta_prod_prev = _F32(1) - alpha_prod_t, _F32(1) - alpha_prod_prev
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = _F32(1) - current_alpha
        x0, _ = self._x0(model_output, sample, alpha_prod_t)
        x0_coeff = alpha_prod_prev ** _F32(0.5) * current_beta / beta_prod_t
        sample_coeff = current_alpha ** _F32(0.5) * beta_prod_prev / beta_prod_t
        prev = x0_coeff * x0 + sample_coeff * sample
        if t > 0:  # diffusers adds variance noise on every step with t > 0, even the last
            if noise is None:
                raise ValueError("DDPM step needs a variance noise array (same shape as the sample)")
            # fixed_small: (1 - a_prev) / (1 - a_t) * beta_t, floored so log/sqrt stay finite
            var = max(beta_prod_prev / beta_prod_t * current_beta, _F32(1e-20))
            kind = self.config.get("variance_type", "fixed_small")
            if kind == "fixed_small":
                std = var ** _F32(0.5)
            elif kind == "fixed_small_log":
                std = np.exp(_F32(0.5) * np.log(var))
            else:  # fixed_large
                std = current_beta ** _F32(0.5)
            prev = prev + _F32(std) * noise
        return prev.astype(_F32)


class DDIMScheduler(_Base):
    """Deterministic DDIM (eta = 0): no noise between steps."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_alpha_cumprod = _F32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise SchedulerConfigError("call set_timesteps before step")
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0(model_output, sample, alpha_prod_t)
        direction = (_F32(1) - alpha_prod_prev) ** _F32(0.5) * eps
        return (alpha_prod_prev ** _F32(0.5) * x0 + direction).astype(_F32)


_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
_BY_CLASS_NAME = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}


def scheduler_from_config(config: dict, kind: str | None = None):
    """kind None follows the config's `_class_name`; "ddpm"/"ddim" override it."""
    if kind is None:
        class_name = config.get("_class_name", "DDPMScheduler")
        if class_name not in _BY_CLASS_NAME:
            raise SchedulerConfigError(f"scheduler class {class_name!r} is not supported (use ddpm or ddim)")
        kind = _BY_CLASS_NAME[class_name]
    if kind not in _CLASSES:
        raise SchedulerConfigError(f"unknown scheduler {kind!r} (choose from {', '.join(SCHEDULER_KINDS)})")
    return _CLASSES[kind].from_config(config)
