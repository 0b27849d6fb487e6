"""Request validation and serving limits (no server)."""

import math

import pytest

from eclipse_export.serve.limits import RequestError, ServeLimits, limits_for_bundle, validate_item

LIMITS = ServeLimits(max_batch=4, max_steps=50, max_size=512, default_size=256, default_steps=20)


def test_defaults_and_values():
    item = validate_item(LIMITS, b"a cube")
    assert (item.prompt, item.seed, item.steps, item.height, item.width) == ("a cube", 0, 20, 256, 256)
    item = validate_item(LIMITS, "x", b"", 2**64 - 1, 50, 7.5, 512, 64)
    assert (item.negative_prompt, item.seed, item.guidance, item.width) == ("", 2**64 - 1, 7.5, 64)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "STEPS 0 is outside 1..50"),
    ({"steps": 51}, "STEPS 51 is outside"),
    ({"steps": 2.5}, "STEPS must be a whole number"),
    ({"height": 96}, "HEIGHT 96 is not a multiple of 64"),
    ({"width": 1024}, "WIDTH 1024 is outside 64..512"),
    ({"guidance": math.inf}, "GUIDANCE inf is outside"),
    ({"guidance": "x"}, "GUIDANCE must be a number"),
    ({"seed": -1}, "SEED -1 is outside"),
    ({"seed": 2**64}, "SEED"),
    ({"prompt": b"\xff\xfe"}, "PROMPT is not UTF-8"),
    ({"prompt": "a" * 2049}, "PROMPT is longer than 2048 bytes"),
    ({"prompt": "a\x00b"}, "NUL"),
    ({"prompt": 3}, "PROMPT must be text"),
    ({"negative_prompt": b"x" * 4096}, "NEGATIVE_PROMPT is 4096 bytes"),
])
def test_bad_values_are_refused(fields, message):
    fields = {"prompt": "ok", **fields}
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_item(LIMITS, **fields)


def test_engine_profiles_narrow_the_limits():
    manifest = {"dims": {"S": 8}, "engines": {
        "unet": {"profile": {"sample": [[1, 4, 32, 32], [2, 4, 64, 64], [4, 4, 96, 96]]}, "static": False},
        "movq": {"profile": {"latents": [[1, 4, 32, 32], [1, 4, 64, 64], [2, 4, 96, 96]]}, "static": False},
    }}
    limits = limits_for_bundle(manifest, ServeLimits(max_batch=8, max_size=1024, default_size=512))
    assert (limits.max_batch, limits.min_size, limits.max_size, limits.default_size) == (2, 256, 768, 512)
    static = {"dims": {"S": 8}, "engines": {
        "unet": {"profile": {"sample": [[1, 4, 64, 64], [2, 4, 64, 64], [2, 4, 64, 64]]}, "static": True}}}
    limits = limits_for_bundle(static, ServeLimits(default_size=256))
    assert limits.static_size == (512, 512) and limits.max_batch == 1
    with pytest.raises(RequestError, match="serves 512x512 images only"):
        validate_item(limits, "x", height=512, width=448)
    assert validate_item(limits, "x").height == 512


def test_limits_that_no_request_could_meet_are_refused():
    with pytest.raises(ValueError, match="default 60 must be within 1..max 50"):
        ServeLimits(max_steps=50, default_steps=60).checked()
    with pytest.raises(ValueError, match="unknown serving limits"):
        ServeLimits.from_json({"max_batch": 2, "path": "/etc"})
