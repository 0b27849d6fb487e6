"""diffusers' UnCLIPScheduler (Karlo's decoder and super-resolution sampler) in numpy,
step-for-step equal to diffusers (tests: within 1e-6).

What differs from DDPM: the timesteps are round(i * (T - 1) / (n - 1)) for i = n-1 .. 0 (so the
last step is t = 0, which adds no noise), beta is recomputed from the two alpha-bars of the
skipped-to step, and the variance is either fixed ("fixed_small_log": the posterior's standard
deviation via exp(0.5 * log)) or learned ("learned_range": the model's extra channels v
interpolate log beta and the log posterior variance, frac = (v + 1) / 2). Arithmetic is float32,
in diffusers' operation order. The variance noises are drawn up front (runtime/noise.py) and
passed in per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eclipse_export.runtime.schedulers import SchedulerConfigError, _betas, _cumprod32

_F32 = np.float32
_ONE = _F32(1.0)

VARIANCE_TYPES = ("fixed_small_log", "learned_range")
_DEFAULTS = {"num_train_timesteps": 1000, "variance_type": "fixed_small_log", "clip_sample": True,
             "clip_sample_range": 1.0, "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class UnCLIPStepTerms:
    """One unCLIP step as scalars (UnCLIPScheduler.step_terms): with eps the model's noise
    prediction (after guidance) and v its variance channels,

        x0   = clamp((x - b * eps) / a, -clip, clip)                     float32
        prev = c_x0 * x0 + c_x * x                                        float32
        std  = std (fixed_small_log)                                      float32 scalar
             | f32(exp(0.5 * (f * max_log + (1 - f) * min_log))),         float64, f = f64((v + 1) / 2)
               (learned_range, per element)
        prev = prev + std * noise            only when `noise` (every step but the last)

    `apply_unclip_step` is the numpy statement; the device kernel and step graphs compute the
    same in the same order."""

    a: float
    b: float
    clip: float  # +inf: no clipping
    c_x0: float
    c_x: float
    noise: bool  # False at t = 0: the last step adds no noise
    learned: bool  # learned_range: std per element from the variance channels
    std: float  # fixed_small_log's standard deviation (0 where noise is False)
    min_log: float  # learned_range: log of the posterior variance and of beta (float64)
    max_log: float


def apply_unclip_step(k: UnCLIPStepTerms, eps: np.ndarray, x: np.ndarray, variance: np.ndarray | None,
                      noise: np.ndarray | None, x0: np.ndarray | None = None) -> np.ndarray:
    """UnCLIPScheduler.step from its terms: float32 except the learned std (float64 exp, rounded
    once). x0 given: a "sample" model's prediction (no division)."""
    if x0 is None:
        x0 = (x - _F32(k.b) * eps) / _F32(k.a)
    if k.clip != float("inf"):
        x0 = np.clip(x0, _F32(-k.clip), _F32(k.clip))
    prev = _F32(k.c_x0) * x0 + _F32(k.c_x) * x
    if noise is not None:
        if k.learned:
            frac = ((variance + _ONE) / _F32(2)).astype(np.float64)
            std = np.exp(0.5 * (frac * np.float64(k.max_log) + (1.0 - frac) * np.float64(k.min_log))).astype(_F32)
        else:
            std = _F32(k.std)
        prev = prev + std * noise
    return prev.astype(_F32, copy=False)


class UnCLIPScheduler:
    needs_noise = True
    init_noise_sigma = 1.0

    def __init__(self, config: dict):
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            raise SchedulerConfigError("UnCLIPScheduler supports beta_schedule 'squaredcos_cap_v2' only, "
                                       f"got {cfg['beta_schedule']!r}")
        if cfg["variance_type"] not in VARIANCE_TYPES:
            raise SchedulerConfigError(f"variance_type={cfg['variance_type']!r} is not supported "
                                       f"(supported: {', '.join(VARIANCE_TYPES)})")
        if cfg["prediction_type"] not in ("epsilon", "sample"):
            raise SchedulerConfigError(f"prediction_type={cfg['prediction_type']!r} is not supported "
                                       "(supported: epsilon, sample)")
        n = int(cfg["num_train_timesteps"])
        if n < 2:
            raise SchedulerConfigError(f"num_train_timesteps must be >= 2, got {n}")
        self.config = cfg
        self.num_train_timesteps = n
        self.variance_type = cfg["variance_type"]
        self.clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        self.betas = _betas({"num_train_timesteps": n, "trained_betas": None, "beta_schedule": "squaredcos_cap_v2",
                             "beta_start": 0.0, "beta_end": 0.0, "rescale_betas_zero_snr": False})
        self.alphas = (_ONE - self.betas).astype(_F32)
        self.alphas_cumprod = _cumprod32(self.alphas)
        self.timesteps = np.arange(n)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        if not isinstance(num_inference_steps, int) or not 2 <= num_inference_steps <= self.num_train_timesteps:
            # diffusers divides by (steps - 1): one step is not defined for this scheduler
            raise ValueError(f"steps must be between 2 and {self.num_train_timesteps} for the unCLIP scheduler, "
                             f"got {num_inference_steps}")
        ratio = (self.num_train_timesteps - 1) / (num_inference_steps - 1)
        self.timesteps = (np.arange(num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)

    def prev_timestep(self, i: int) -> int:
        """The timestep after step i of the current schedule (diffusers' pipeline passes it)."""
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else int(self.timesteps[i]) - 1

    def _terms(self, t: int, prev: int):
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev] if prev >= 0 else _ONE
        beta_prod_t = _ONE - alpha_prod_t
        beta_prod_t_prev = _ONE - alpha_prod_t_prev
        if prev == t - 1:
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = _ONE - alpha_prod_t / alpha_prod_t_prev
            alpha = _ONE - beta
        return alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev, _F32(beta), _F32(alpha)

    def step_terms(self, t: int, prev: int | None = None) -> UnCLIPStepTerms:
        """Step t (to `prev`, default t - 1) reduced to scalars: what `step` computes with, and
        what the device loops (runtime/backends/kernels/guided_step.cu `unclip_step`, the ONNX
        step graphs of export/step_graph.py) receive per step. Epsilon prediction only (a
        "sample" model has no device step: ValueError, the chain then loops on the host)."""
        if self.config["prediction_type"] != "epsilon":
            raise ValueError("the unCLIP device step is defined for epsilon prediction only")
        return self._step_terms(t, prev)

    def _step_terms(self, t: int, prev: int | None) -> UnCLIPStepTerms:
        t = int(t)
        prev = t - 1 if prev is None else int(prev)
        a_t, a_prev, b_t, b_prev, beta, alpha = self._terms(t, prev)
        std, min_log, max_log = _F32(0.0), 0.0, 0.0
        if t > 0:
            # log and exp in float64, rounded once to float32 (diffusers: float32 throughout, within
            # 1e-7 relative): libraries' float32 exp/log differ by an ulp (numpy's SIMD ones vs
            # glibc's), their float64 ones by far less than a float32 ulp, so the C runtime
            # (cpp/src/core/unclip_scheduler.cpp) gets the same pixels
            variance = np.float64(b_prev / b_t * beta)
            if self.variance_type == "fixed_small_log":
                std = _F32(np.exp(0.5 * np.log(max(variance, 1e-20))))
            else:
                min_log, max_log = float(np.log(variance)), float(np.log(np.float64(beta)))
        return UnCLIPStepTerms(
            a=float(np.sqrt(a_t)), b=float(np.sqrt(b_t)), clip=float("inf") if self.clip is None else self.clip,
            c_x0=float((np.sqrt(a_prev) * beta) / b_t), c_x=float(np.sqrt(alpha) * b_prev / b_t),
            noise=t > 0, learned=self.variance_type == "learned_range", std=float(std),
            min_log=min_log, max_log=max_log)

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, prev_timestep: int | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        t = int(timestep)
        channels = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * channels and self.variance_type == "learned_range":
            model_output, predicted_variance = model_output[:, :channels], model_output[:, channels:]
        k = self._step_terms(t, prev_timestep)
        if k.noise and noise is None:
            raise ValueError("the unCLIP scheduler adds variance noise at every step but the last; none was given")
        if k.noise and k.learned and predicted_variance is None:
            raise ValueError("learned_range variance needs the model's variance channels "
                             f"({2 * channels} output channels, got {model_output.shape[1]})")
        x0 = model_output if self.config["prediction_type"] == "sample" else None
        return apply_unclip_step(k, model_output, sample, predicted_variance, noise if k.noise else None, x0)


def unclip_scheduler_from_config(config: dict) -> UnCLIPScheduler:
    name = config.get("_class_name", "UnCLIPScheduler")
    if name not in ("UnCLIPScheduler",):
        raise SchedulerConfigError(f"the Karlo chain samples with UnCLIPScheduler, the config names {name!r}")
    return UnCLIPScheduler(config)
