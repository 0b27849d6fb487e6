"""Numpy DDPM and DDIM schedulers, step-for-step equal to diffusers' (tested within 1e-6).

Configured from a diffusers `scheduler_config.json` dict, which the bundle ships as read from
the checkpoint (clip_sample differs between revisions of Kandinsky 2.2's config). Arithmetic
is float32 throughout, as in diffusers, so both accumulate the same rounding. Bit equality is
out of reach: torch's CPU float32 sqrt is not always correctly rounded (1 ulp off for a few
values in a thousand), numpy's is.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

SCHEDULER_KINDS = ("ddpm", "ddim")
_F32 = np.float32
_ONE = _F32(1.0)

# diffusers' __init__ defaults for the keys read here: a config that omits a key means these
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "variance_type": "fixed_small",  # DDPM only
    "set_alpha_to_one": True,  # DDIM only
}


class SchedulerConfigError(ValueError):
    """The scheduler config or request is outside what this runtime implements."""


def _choice(cfg: dict, key: str, allowed: tuple) -> str:
    if cfg[key] not in allowed:
        raise SchedulerConfigError(f"{key}={cfg[key]!r} is not supported (supported: {', '.join(allowed)})")
    return cfg[key]


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: float32 endpoints and step,
    evaluated in double from the nearer end (that is how torch's CPU kernel does it)."""
    if n == 1:
        return np.array([start], dtype=_F32)
    s, e = np.float64(_F32(start)), np.float64(_F32(end))
    step = np.float64((_F32(end) - _F32(start)) / _F32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, s + step * i, e - step * (n - 1 - i)).astype(_F32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    # torch's float32 cumprod accumulates in double; doing the same gives identical values
    return np.cumprod(x.astype(np.float64)).astype(_F32)


def _betas(cfg: dict) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:  # diffusers lets explicit betas override beta_schedule
        betas = np.asarray(cfg["trained_betas"], dtype=_F32)
        if betas.shape != (n,):
            raise SchedulerConfigError(f"trained_betas has {betas.size} values, num_train_timesteps is {n}")
    else:
        schedule = _choice(cfg, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
        if schedule == "linear":
            betas = _linspace32(start, end, n)
        elif schedule == "scaled_linear":
            betas = _linspace32(start**0.5, end**0.5, n) ** 2
        else:  # cosine alpha-bar (Nichol & Dhariwal), built in double and rounded once, like diffusers
            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], _F32)
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last one is exactly 0."""
    root = np.sqrt(_cumprod32(_ONE - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return _ONE - alphas


@dataclass(frozen=True)
class StepCoefficients:
    """One epsilon-prediction step reduced to scalars, so a GPU backend can run it as one fused
    elementwise kernel with the latents left on the device:

        x0   = clamp((x - b * eps) / a, -clip, clip)
        prev = c_x0 * x0 + c_x * x + c_eps * eps + std * noise

    `apply_step` below is the numpy statement of that kernel; tests hold it to `step`.
    """

    a: float
    b: float
    clip: float  # +inf: no clipping
    c_x0: float
    c_x: float
    c_eps: float
    std: float  # 0: the step adds no noise

    def astuple(self) -> tuple[float, ...]:
        return (self.a, self.b, self.clip, self.c_x0, self.c_x, self.c_eps, self.std)


def apply_step(k: StepCoefficients, eps: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """What the device kernel computes (same operation order, float32)."""
    f = [_F32(v) for v in k.astuple()]
    a, b, clip, c_x0, c_x, c_eps, std = f
    x0 = np.clip((x - b * eps) / a, -clip, clip)
    prev = c_x0 * x0 + c_x * x + c_eps * eps
    if noise is not None and std != 0:
        prev = prev + std * noise
    return prev.astype(_F32, copy=False)


class _Base:
    init_noise_sigma = 1.0
    needs_noise = False

    def __init__(self, config: dict):
        self.config = dict(config)
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        if cfg["thresholding"]:
            raise SchedulerConfigError("thresholding=True is not supported (pixel-space dynamic thresholding)")
        self.prediction_type = _choice(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        self.timestep_spacing = _choice(cfg, "timestep_spacing", ("leading", "linspace", "trailing"))
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        if self.num_train_timesteps < 1:
            raise SchedulerConfigError(f"num_train_timesteps={self.num_train_timesteps} must be at least 1")
        self.steps_offset = int(cfg["steps_offset"])
        self.clip_range = _F32(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        self.alphas_cumprod = _cumprod32(_ONE - _betas(cfg))
        self._cfg = cfg
        # before set_timesteps diffusers walks every trained timestep; so do we
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].astype(np.int64)
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict):
        return cls(config)

    def to_config(self) -> dict:
        """The config as given, naming this class (so it round-trips through scheduler_from_config)."""
        return {**self.config, "_class_name": type(self).__name__}

    def set_timesteps(self, num_inference_steps: int) -> None:
        try:
            n = operator.index(num_inference_steps)
        except TypeError:
            raise SchedulerConfigError(f"steps must be an integer, got {num_inference_steps!r}") from None
        total = self.num_train_timesteps
        if not 1 <= n <= total:
            raise SchedulerConfigError(f"steps must be between 1 and {total} (the trained timesteps), got {n}")
        if self.timestep_spacing == "linspace":
            t = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            t = (np.arange(n) * (total // n))[::-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            t = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
        # Where diffusers' own schedule is broken we refuse rather than copy it: leading + steps_offset
        # reaches timestep `total` (IndexError mid-loop in diffusers), and trailing's float arange
        # sometimes yields n + 1 steps ending at -1 (diffusers then silently uses alphas_cumprod[-1]).
        if len(t) != n or t.min() < 0 or t.max() >= total:
            raise SchedulerConfigError(
                f"timestep_spacing={self.timestep_spacing!r} with {n} steps gives timesteps outside 0..{total - 1} "
                f"in diffusers ({t[0]}..{t[-1]}, {len(t)} steps); choose another step count")
        self.timesteps, self.num_inference_steps = t.copy(), n

    def _require_epsilon(self) -> None:
        # Kandinsky 2.2 predicts epsilon; the fused device step covers only that
        if self.prediction_type != "epsilon":
            raise SchedulerConfigError(f"prediction_type={self.prediction_type!r} has no device step (epsilon only)")

    def _clip_value(self) -> float:
        return float(self.clip_range) if self.clip_range is not None else math.inf

    def _alpha_prod(self, t: int, final: np.float32) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else final

    def _predict(self, model_output, sample, alpha_prod_t):
        """(x0, eps): the clean sample and the noise the model output implies."""
        beta_prod_t = _ONE - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - np.sqrt(alpha_prod_t) * x0) / np.sqrt(beta_prod_t)
        else:  # v_prediction
            x0 = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            eps = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample
        if self.clip_range is not None:
            # diffusers clips x0 but keeps the unclipped eps for DDIM's direction term (use_clipped_model_output=False)
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        return x0, eps


class DDPMScheduler(_Base):
    """Ancestral DDPM: every step with t > 0 adds variance noise, which the caller supplies."""

    needs_noise = True

    def __init__(self, config: dict):
        super().__init__(config)
        if self._cfg["variance_type"] == "fixed_large_log":
            # diffusers takes sqrt(log(beta)) of a negative number there: NaN samples
            raise SchedulerConfigError("variance_type='fixed_large_log' is not supported (diffusers yields NaN)")
        if self._cfg["variance_type"] in ("learned", "learned_range"):
            raise SchedulerConfigError(
                f"variance_type={self._cfg['variance_type']!r} is not supported "
                "(the UNet graph has no variance output)")
        self.variance_type = _choice(self._cfg, "variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))

    def _prev(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        where = np.nonzero(self.timesteps == t)[0]
        if not len(where):
            raise ValueError(f"timestep {t} is not in this schedule (set_timesteps({self.num_inference_steps}))")
        i = int(where[0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        model_output, sample = np.asarray(model_output, _F32), np.asarray(sample, _F32)
        t = int(timestep)
        alpha_prod_t, x0_coeff, sample_coeff, std = self._terms(t)
        x0, _ = self._predict(model_output, sample, alpha_prod_t)
        prev = x0_coeff * x0 + sample_coeff * sample
        # diffusers draws noise on every step with t > 0, the last one included, where fixed_small's
        # variance is 0 floored to 1e-20 (std 1e-10): the draw matters only for the RNG stream
        if t > 0:
            if noise is None:
                raise ValueError(f"DDPM step at t={t} needs a variance noise array (standard normal, sample's shape)")
            noise = np.asarray(noise, _F32)
            if noise.shape != sample.shape:
                raise ValueError(f"variance noise has shape {noise.shape}, the sample {sample.shape}")
            prev = prev + std * noise
        return prev.astype(_F32, copy=False)

    def _terms(self, t: int) -> tuple[np.float32, np.float32, np.float32, np.float32]:
        """(alpha_prod_t, x0 coefficient, sample coefficient, variance std) of the step at t, in
        float32 as diffusers computes them; std is 0 at t = 0, where no noise is added."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self._alpha_prod(self._prev(t), _ONE)
        beta_prod_t, beta_prod_prev = _ONE - alpha_prod_t, _ONE - alpha_prod_prev
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = _ONE - current_alpha
        x0_coeff = np.sqrt(alpha_prod_prev) * current_beta / beta_prod_t
        sample_coeff = np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
        std = _F32(0.0)
        if t > 0:
            small = max(beta_prod_prev / beta_prod_t * current_beta, _F32(1e-20))
            if self.variance_type == "fixed_small":
                std = np.sqrt(small)
            elif self.variance_type == "fixed_small_log":  # same quantity, through log/exp as diffusers does
                std = np.exp(_F32(0.5) * np.log(small))
            else:  # fixed_large: beta_t itself, so the last step adds real noise
                std = np.sqrt(current_beta)
        return alpha_prod_t, x0_coeff, sample_coeff, std


    def step_coefficients(self, timestep: int) -> StepCoefficients:
        self._require_epsilon()
        alpha_prod_t, x0_coeff, sample_coeff, std = self._terms(int(timestep))
        return StepCoefficients(
            a=float(np.sqrt(alpha_prod_t)), b=float(np.sqrt(_ONE - alpha_prod_t)), clip=self._clip_value(),
            c_x0=float(x0_coeff), c_x=float(sample_coeff), c_eps=0.0, std=float(std))


class DDIMScheduler(_Base):
    """Deterministic DDIM (eta = 0): no noise between steps; `noise` is accepted and ignored."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_alpha_cumprod = _ONE if self._cfg["set_alpha_to_one"] else self.alphas_cumprod[0]

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise ValueError("DDIM needs set_timesteps before step")
        model_output, sample = np.asarray(model_output, _F32), np.asarray(sample, _F32)
        t = int(timestep)
        # diffusers steps back by total // n whatever the spacing, not to the next listed timestep
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self._alpha_prod(prev_t, self.final_alpha_cumprod)
        x0, eps = self._predict(model_output, sample, alpha_prod_t)
        prev = np.sqrt(alpha_prod_prev) * x0 + np.sqrt(_ONE - alpha_prod_prev) * eps
        return prev.astype(_F32, copy=False)

    def step_coefficients(self, timestep: int) -> StepCoefficients:
        if self.num_inference_steps is None:
            raise ValueError("DDIM needs set_timesteps before step")
        self._require_epsilon()
        t = int(timestep)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self._alpha_prod(t - self.num_train_timesteps // self.num_inference_steps,
                                           self.final_alpha_cumprod)
        return StepCoefficients(
            a=float(np.sqrt(alpha_prod_t)), b=float(np.sqrt(_ONE - alpha_prod_t)), clip=self._clip_value(),
            c_x0=float(np.sqrt(alpha_prod_prev)), c_x=0.0, c_eps=float(np.sqrt(_ONE - alpha_prod_prev)), std=0.0)


_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
_BY_CLASS_NAME = {cls.__name__: kind for kind, cls in _CLASSES.items()}


def scheduler_from_config(config: dict, kind: str | None = None):
    """kind None follows the config's `_class_name`; "ddpm"/"ddim" override it (any config of
    either class drives either scheduler, as diffusers' from_config allows)."""
    if kind is None:
        class_name = config.get("_class_name", "DDPMScheduler")
        if class_name not in _BY_CLASS_NAME:
            raise SchedulerConfigError(
                f"_class_name={class_name!r} is not supported (supported: {', '.join(_BY_CLASS_NAME)})")
        kind = _BY_CLASS_NAME[class_name]
    if kind not in _CLASSES:
        raise SchedulerConfigError(f"unknown scheduler kind {kind!r} (choose from {', '.join(SCHEDULER_KINDS)})")
    return _CLASSES[kind].from_config(config)
