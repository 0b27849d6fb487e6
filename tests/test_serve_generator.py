"""The serving generator (no server): batched rows of different seeds give each seed's own
image, with and without a negative prompt; a failing group does not fail the others."""

import numpy as np
import pytest

from eclipse_export.serve.generator import Generator
from eclipse_export.serve.limits import ServeLimits, validate_item

LIMITS = ServeLimits(max_batch=3, max_steps=4, max_size=128, default_size=64, default_steps=2)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator(tiny_bundle):
    return Generator(tiny_bundle, LIMITS, threads=1)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_batched_rows_equal_single_generations(generator, tiny_pipeline, negative):
    # 4 rows of one group: batches of max_batch (3) and 1; one row of another size
    items = [validate_item(LIMITS, f"prompt {seed}", negative, seed, guidance=5.0) for seed in (0, 1, 2, 2**64 - 1)]
    items.append(validate_item(LIMITS, "other size", negative, 9, height=128, width=64))
    results = generator.generate(items)
    for item, image in zip(items, results):
        expected = tiny_pipeline.generate(item.prompt, item.negative_prompt, item.height, item.width, item.steps,
                                          item.guidance, item.seed).images[0]
        assert np.array_equal(image, expected), item


def test_a_failing_group_leaves_the_others(generator, monkeypatch):
    good = validate_item(LIMITS, "fine", seed=1)
    bad = validate_item(LIMITS, "fails", seed=2, steps=3)
    real = generator._run

    def run(batch):
        if batch[0].steps == 3:
            raise RuntimeError("backend failed")
        return real(batch)

    monkeypatch.setattr(generator, "_run", run)
    results = generator.generate([good, bad])
    assert isinstance(results[1], RuntimeError) and results[0].shape == (64, 64, 3)
