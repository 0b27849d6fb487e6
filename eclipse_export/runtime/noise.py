"""All the randomness of one generation, drawn up front so that runs can be compared exactly.

The runtime and the PyTorch reference consume the same `Noises`; a seed makes them
reproducible, and callers may inject their own arrays instead.

The generator is specified bit for bit, so that a seed means the same image in every runtime
(the C/C++ runtime in cpp/ implements the same statement and is tested against this one).
numpy's `standard_normal` could not serve: its ziggurat depends on numpy's own constant tables
and libm-based tail, which another language would have to copy (see docs/decisions.md).

    seed   : 0 .. 2**64 - 1
    stream : 0 prior noise, 1 initial latents, 2 DDPM variance noises (all steps, in order);
             Karlo (runtime/chains/karlo.py) adds 3 super-resolution initial noise, 4 its
             per-step variance noises (1 and 2 are its 64 px decoder's)
    block n (n = 0, 1, ...) = Philox4x64-10(counter = (n, 0, 0, 0), key = (seed, stream))
             (Salmon et al. 2011, Random123's reference; 64-bit words, counter word 0 least
             significant), giving four uint64 words w0, w1, w2, w3, used in that order
    word k of the stream: block k // 4, word k % 4
    pair j uses words 2j (a) and 2j + 1 (b):
        u1 = ((a >> 11) + 1) * 2**-53         uniform in (0, 1]: log(u1) is finite
        u2 = (b >> 11) * 2**-53               uniform in [0, 1)
        r  = sqrt(-2 * log(u1)),  theta = 6.283185307179586 * u2      (all float64)
        normal 2j = float32(r * cos(theta)),  normal 2j + 1 = float32(r * sin(theta))
    a tensor of N values takes normals 0 .. N - 1 of its stream in C order; an odd N drops the
    last pair's sine.

Words come from numpy's own `np.random.Philox` (its counter is started at 2**256 - 1 because it
increments before each block, so that its first block is counter 0, the Random123 test vector).
log/cos/sin are the platform's float64 ones; they differ between libraries by a few float64
ulps at most, which changes a float32 result by 1 float32 ulp in rare cases (tests: <= 1e-6).

One stream per purpose makes each draw independent of the others' sizes: a seed's initial
latents do not change with the step count or the prior's batch, and a negative prompt (which
doubles the prior's batch, positive rows first) leaves the positive rows' prior noise, and so
the positive image embedding, as it was without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STREAM_PRIOR, STREAM_LATENTS, STREAM_STEPS = 0, 1, 2
STREAM_SR_LATENTS, STREAM_SR_STEPS = 3, 4  # Karlo's super-resolution loop
SEED_MAX = 2**64 - 1
_TWO_PI = 6.283185307179586  # float64 nearest to 2*pi (== 2 * math.pi exactly)
_INV_2_53 = 2.0**-53


def philox_words(seed: int, stream: int, count: int) -> np.ndarray:
    """The first `count` uint64 words of (seed, stream)."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be between 0 and 2**64 - 1, got {seed}")
    key = np.array([seed, stream], dtype=np.uint64)
    bits = np.random.Philox(key=key, counter=2**256 - 1)  # first block: counter 0
    return bits.random_raw(count)


def standard_normal(seed: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normals of the given shape from (seed, stream), as the module docstring says."""
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.int64))
    pairs = (count + 1) // 2
    words = philox_words(seed, stream, 2 * pairs)
    u1 = ((words[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * _INV_2_53
    u2 = (words[1::2] >> np.uint64(11)).astype(np.float64) * _INV_2_53
    r = np.sqrt(-2.0 * np.log(u1))
    theta = _TWO_PI * u2
    out = np.empty((pairs, 2), dtype=np.float64)
    out[:, 0] = r * np.cos(theta)
    out[:, 1] = r * np.sin(theta)
    return out.reshape(-1)[:count].astype(np.float32).reshape(shape)


@dataclass(frozen=True)
class Noises:
    prior: np.ndarray  # (prior batch, D): the prior's hidden_states input (Gaussian, not zeros)
    latents: np.ndarray  # (B, C, h, w): initial latents before init_noise_sigma
    steps: np.ndarray | None  # (steps, B, C, h, w): DDPM variance noise per step; None for DDIM

    @staticmethod
    def draw(seed: int, prior_batch: int, embed_dim: int, latent_shape: tuple[int, int, int, int],
             steps: int, needs_step_noise: bool) -> "Noises":
        prior = standard_normal(seed, STREAM_PRIOR, (prior_batch, embed_dim))
        latents = standard_normal(seed, STREAM_LATENTS, tuple(latent_shape))
        per_step = standard_normal(seed, STREAM_STEPS, (steps, *latent_shape)) if needs_step_noise else None
        return Noises(prior, latents, per_step)

    def check(self, prior_batch: int, embed_dim: int, latent_shape: tuple[int, ...], steps: int,
              needs_step_noise: bool) -> None:
        """Injected noises must fit this generation exactly; say which one does not."""
        problems = []
        if self.prior.shape != (prior_batch, embed_dim):
            problems.append(f"prior noise {self.prior.shape} != {(prior_batch, embed_dim)}")
        if self.latents.shape != tuple(latent_shape):
            problems.append(f"latents {self.latents.shape} != {tuple(latent_shape)}")
        if needs_step_noise and (self.steps is None or self.steps.shape != (steps, *latent_shape)):
            got = None if self.steps is None else self.steps.shape
            problems.append(f"step noise {got} != {(steps, *latent_shape)}")
        if problems:
            raise ValueError("injected noises do not fit: " + "; ".join(problems))
