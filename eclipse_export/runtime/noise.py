"""All the randomness of one generation, drawn up front so that runs can be compared exactly.

The runtime and the PyTorch reference consume the same `Noises`; a seed makes them
reproducible (numpy PCG64), and callers may inject their own arrays instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Noises:
    prior: np.ndarray  # (prior batch, D): the prior's hidden_states input (Gaussian, not zeros)
    latents: np.ndarray  # (B, C, h, w): initial latents before init_noise_sigma
    steps: np.ndarray | None  # (steps, B, C, h, w): DDPM variance noise per step; None for DDIM

    @staticmethod
    def draw(seed: int, prior_batch: int, embed_dim: int, latent_shape: tuple[int, int, int, int],
             steps: int, needs_step_noise: bool) -> "Noises":
        # Draw order is part of the contract: prior, latents, then every step's noise.
        rng = np.random.Generator(np.random.PCG64(seed))
        prior = rng.standard_normal((prior_batch, embed_dim), dtype=np.float32)
        latents = rng.standard_normal(latent_shape, dtype=np.float32)
        per_step = rng.standard_normal((steps, *latent_shape), dtype=np.float32) if needs_step_noise else None
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
