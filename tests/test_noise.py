"""The portable noise generator: Philox4x64-10 words, the Box-Muller statement, stream layout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eclipse_export.runtime.noise import (
    STREAM_LATENTS,
    STREAM_PRIOR,
    STREAM_STEPS,
    Noises,
    philox_words,
    standard_normal,
)

M = 2**64 - 1
# Random123's known-answer vectors for philox4x64_10: (counter words, key words) -> block
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B)),
    ((M, M, M, M), (M, M), (0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0)),
    ((0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89),
     (0x452821E638D01377, 0xBE5466CF34E90C6C),
     (0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6)),
]


@pytest.mark.parametrize("counter, key, block", KAT)
def test_numpy_philox_gives_the_reference_blocks(counter, key, block):
    """The bit source is numpy's Philox, held to the algorithm's published vectors (so the
    counter convention the docstring states is the one numpy runs)."""
    ctr = sum(w << (64 * i) for i, w in enumerate(counter))
    bits = np.random.Philox(key=np.array(key, dtype=np.uint64), counter=(ctr - 1) % 2**256)
    assert [int(w) for w in bits.random_raw(4)] == list(block)


def test_stream_starts_at_counter_zero():
    assert [int(w) for w in philox_words(0, 0, 4)] == list(KAT[0][2])


def _scalar_normals(seed: int, stream: int, count: int) -> list[float]:
    """The docstring's statement, one value at a time with Python's math module."""
    words = [int(w) for w in philox_words(seed, stream, 2 * ((count + 1) // 2))]
    out = []
    for a, b in zip(words[0::2], words[1::2]):
        u1 = ((a >> 11) + 1) * 2.0**-53
        u2 = (b >> 11) * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        out += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    return out[:count]


@pytest.mark.parametrize("seed, count", [(0, 1), (1, 7), (2**64 - 1, 1000), (123456789, 4096)])
def test_vectorised_normals_follow_the_scalar_statement(seed, count):
    got = standard_normal(seed, STREAM_LATENTS, (count,))
    want = np.array(_scalar_normals(seed, STREAM_LATENTS, count), dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == (count,)
    assert np.max(np.abs(got - want)) <= 1e-6


def test_normals_look_standard():
    x = standard_normal(5, STREAM_STEPS, (1_000_000,)).astype(np.float64)
    assert abs(x.mean()) < 0.005 and abs(x.std() - 1) < 0.005
    assert np.isfinite(x).all() and np.abs(x).max() < 8.6  # Box-Muller with u1 in (0,1] is bounded


def test_streams_are_independent_and_prefix_stable():
    a = Noises.draw(3, 1, 16, (1, 4, 8, 8), 5, True)
    b = Noises.draw(3, 2, 16, (1, 4, 8, 8), 9, True)  # negative prompt doubles the prior batch; more steps
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.prior[0], b.prior[0])  # positive row unchanged by the negative row
    np.testing.assert_array_equal(a.steps, b.steps[:5])
    assert not np.array_equal(standard_normal(3, STREAM_PRIOR, (64,)), standard_normal(3, STREAM_LATENTS, (64,)))
    assert not np.array_equal(standard_normal(3, STREAM_PRIOR, (64,)), standard_normal(4, STREAM_PRIOR, (64,)))


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_range(seed):
    with pytest.raises(ValueError, match="seed"):
        standard_normal(seed, 0, (4,))
