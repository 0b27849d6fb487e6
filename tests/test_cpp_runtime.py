"""The C/C++ runtime (cpp/) against the Python runtime, through its C API (ctypes).

Graphs run on ONNX Runtime's Python package through the library's custom backend, so the whole
C++ chain is checked here without ONNX Runtime's C headers. `make test` builds the library
(build/cpp) and runs this module a second time on an AddressSanitizer + UBSan build.
"""

from __future__ import annotations

import ctypes as C
import json
import math
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.export.calibration_prompts import load_prompts
from eclipse_export.runtime.bundle import FORMAT_VERSION, BundleError, file_entry, open_bundle
from eclipse_export.runtime.noise import (
    STREAM_LATENTS,
    STREAM_PRIOR,
    STREAM_STEPS,
    Noises,
    standard_normal,
)
from eclipse_export.runtime.pipeline import Pipeline, Request
from eclipse_export.runtime.schedulers import (
    SchedulerConfigError,
    scheduler_from_config,
)
from eclipse_export.runtime.tokenizer import ClipTokenizer
from eclipse_export.verify.cpp import (
    ERR_BACKEND,
    ERR_BUNDLE,
    ERR_CANCELLED,
    ERR_INVALID_ARGUMENT,
    ERR_UNSUPPORTED,
    ROOT,
    SCHEDULERS,
    EclipseError,
    OrtGraphs,
    Runtime,
    StepCoefficients,
    check,
    load_library,
)

from .sanitizers import SANITIZER_CHILD, run_module_under_sanitizers


@pytest.fixture(scope="module")
def lib():
    return load_library()


@pytest.fixture(scope="module")
def bundle(request) -> Path:
    given = os.environ.get("ECLIPSE_TEST_BUNDLE")  # the sanitizer run reuses the parent's bundle
    return Path(given) if given else request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="module")
def graphs():
    return OrtGraphs()


@pytest.fixture(scope="module")
def runtime(lib, bundle, graphs):
    rt = Runtime(lib, bundle, graphs.table)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def python(bundle) -> Pipeline:
    return Pipeline.from_bundle(bundle)


def python_image(pipe: Pipeline, prompt, negative_prompt=None, height=64, width=64, steps=3, guidance_scale=4.0,
                 seed=0, scheduler=None):
    # Request built directly: the C runtime's rules (empty prompt accepted, "" negative = prior on "")
    # are what the Python runtime does with such a request
    req = Request((prompt,), negative_prompt, height, width, steps, float(guidance_scale), seed, scheduler)
    return pipe.run(req).images[0]


# --- the whole chain: same seed, same image ---------------------------------------------------

CHAIN_CASES = [
    dict(prompt="a red cube on a blue sphere", steps=4),  # the bundle's DDPM, CFG 4
    dict(prompt="a photo of a teal scarf with a pink chair", height=128, width=64, guidance_scale=1.0, seed=1,
         scheduler="ddpm"),  # no CFG, second size
    dict(prompt="Several silver butterflys and one pink bench", negative_prompt="blurry, low quality", seed=2,
         scheduler="ddim"),
    dict(prompt="3 green teapots and one white hat", negative_prompt="", width=128, seed=3, scheduler="ddpm"),
    dict(prompt="Café au lait, 東京 at night 🌃", seed=2**64 - 1, scheduler="ddim", steps=2),
    dict(prompt="", seed=5, steps=2),  # empty prompt: unconditional generation
    dict(prompt="a dog", negative_prompt="a cat", guidance_scale=1.0, seed=6, scheduler="ddim", steps=2),
]


@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: f"{c.get('scheduler') or 'bundle'}-{c['prompt'][:12]}")
def test_same_seed_same_image_as_python(runtime, python, case):
    args = dict(case)
    prompt = args.pop("prompt")
    got = runtime.generate(prompt, **args)
    want = python_image(python, prompt, **args)
    assert got["image"].shape == want.shape
    diff = np.abs(got["image"].astype(int) - want.astype(int)).max()
    assert diff <= 1, f"max difference {diff} LSB"
    assert set(got["timings"]) >= {"text_encoder", "prior", "unet", "movq", "total"}
    assert all(v >= 0 for v in got["timings"].values())


def test_negative_prompt_rule(runtime):
    """None: the bundle's zero-image embedding; "" is a prompt like any other (the prior runs on it)."""
    base = dict(seed=4, steps=2)
    none = runtime.generate("a lamp", **base)["image"]
    empty = runtime.generate("a lamp", negative_prompt="", **base)["image"]
    other = runtime.generate("a lamp", negative_prompt="dark", **base)["image"]
    assert not np.array_equal(none, empty) and not np.array_equal(empty, other)
    # without CFG the negative half is never used: every negative rule gives the same image
    off = [runtime.generate("a lamp", negative_prompt=n, guidance_scale=1.0, **base)["image"] for n in (None, "", "x")]
    assert np.array_equal(off[0], off[1]) and np.array_equal(off[0], off[2])


def test_warnings_and_bad_requests(runtime, lib):
    assert any("empty" in w for w in runtime.generate("   ", steps=1)["warnings"])
    assert any("truncated" in w for w in runtime.generate("word " * 100, steps=1)["warnings"])
    assert any("no classifier-free guidance" in w for w in runtime.generate("x", guidance_scale=0.5, steps=1)["warnings"])
    for kwargs, message in [(dict(height=100), "multiple of 64"), (dict(width=4096), "between"), (dict(steps=0), "steps"),
                            (dict(steps=2000), "steps"), (dict(guidance_scale=math.nan), "finite")]:
        with pytest.raises(EclipseError, match=message) as e:
            runtime.generate("x", **kwargs)
        assert e.value.status == ERR_INVALID_ARGUMENT
    state, result = C.c_void_p(), C.c_void_p()
    check(lib, lib.eclipse_state_create(runtime.context, C.byref(state)))
    params = lib.eclipse_default_params()
    params.height = params.width = 64
    assert lib.eclipse_generate(state, b"caf\xe9", C.byref(params), C.byref(result)) == ERR_INVALID_ARGUMENT
    assert b"UTF-8" in lib.eclipse_last_error()
    params.negative_prompt = b"caf\xe9"  # issue 19, item 11: said "the prompt" before
    assert lib.eclipse_generate(state, b"x", C.byref(params), C.byref(result)) == ERR_INVALID_ARGUMENT
    assert lib.eclipse_last_error().startswith(b"the negative prompt is not valid UTF-8")
    params.negative_prompt = None
    params.struct_size = 4
    assert lib.eclipse_generate(state, b"x", C.byref(params), C.byref(result)) == ERR_INVALID_ARGUMENT
    assert not result
    lib.eclipse_state_free(state)


def test_injected_noises_and_seed_noises_agree(runtime, python):
    sched = python.make_scheduler(None)
    latent_shape = (1, python.dims["C"], 8, 8)
    drawn = Noises.draw(11, 1, python.dims["D"], latent_shape, 3, sched.needs_noise)
    by_seed = runtime.generate("a boat", seed=11)["image"]
    injected = runtime.generate("a boat", seed=999, noises=drawn)["image"]
    assert np.array_equal(by_seed, injected)
    bad = Noises(drawn.prior, drawn.latents[:, :, :4], drawn.steps)
    with pytest.raises(EclipseError, match="latent noise has 128 values, the request needs 256"):
        runtime.generate("a boat", noises=bad)


def test_cancel_from_the_progress_callback(runtime):
    seen = []

    def progress(i, n):
        seen.append((i, n))
        return 1 if i == 2 else 0

    with pytest.raises(EclipseError) as e:
        runtime.generate("a tree", steps=4, progress=progress)
    assert e.value.status == ERR_CANCELLED and seen == [(1, 4), (2, 4)]
    assert runtime.generate("a tree", steps=2)["image"].shape == (64, 64, 3)  # the context still works


def test_two_threads_generate_at_once_on_one_context(runtime, lib):
    """Loaded components are shared; each thread has its own eclipse_state."""
    jobs = [("a red kite", 21, "ddpm"), ("a green frog", 22, "ddim")]
    alone = [runtime.generate(p, seed=s, scheduler=k)["image"] for p, s, k in jobs]
    barrier, out, errors = threading.Barrier(2), [None, None], []

    def work(i):
        try:
            state = C.c_void_p()
            check(lib, lib.eclipse_state_create(runtime.context, C.byref(state)))
            try:
                barrier.wait()
                out[i] = [runtime.generate(jobs[i][0], seed=jobs[i][1], scheduler=jobs[i][2], state=state)["image"]
                          for _ in range(2)]
            finally:
                lib.eclipse_state_free(state)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(np.array_equal(img, alone[i]) for img in out[i])


def test_device_loop_hook_gives_the_host_loop_image(lib, bundle, runtime):
    """A backend with `denoise` runs the UNet loop itself from the library's per-step coefficients
    (the contract a TensorRT backend implements on the GPU); here numpy plays the device."""
    graphs = OrtGraphs(device_loop=True)
    device = Runtime(lib, bundle, graphs.table, verify_hashes=False)
    try:
        for case in (dict(seed=31, scheduler="ddpm"), dict(seed=32, scheduler="ddim", guidance_scale=1.0),
                     dict(seed=33, negative_prompt="", scheduler="ddpm")):
            got = device.generate("a lighthouse", **case)["image"]
            want = runtime.generate("a lighthouse", **case)["image"]
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert graphs.denoise_calls == 3 and graphs.error is None
        with pytest.raises(EclipseError) as e:
            device.generate("a lighthouse", steps=3, progress=lambda i, n: int(i == 1))
        assert e.value.status == ERR_CANCELLED
    finally:
        device.close()


def test_backend_failures_are_reported(lib, bundle):
    class Broken(OrtGraphs):
        def _run(self, *args):
            return 1

    graphs = Broken()
    rt = Runtime(lib, bundle, graphs.table, verify_hashes=False)
    try:
        with pytest.raises(EclipseError, match="failed to run text_encoder") as e:
            rt.generate("x")
        assert e.value.status == ERR_BACKEND
    finally:
        rt.close()
    assert graphs.sessions == {}  # every loaded session was freed with the context


def test_png_written_by_the_library(runtime, tmp_path):
    from PIL import Image

    out = runtime.generate("a red cube", seed=3, png=tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")), out["image"])
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(EclipseError, match="does not exist"):
        runtime.generate("a red cube", png=tmp_path / "no" / "x.png")


# --- pieces: tokenizer, scheduler, noise ------------------------------------------------------

AWKWARD = [
    "", " ", "café crème brûlée à la mode", "Ångström naïve façade", "cafe\u0301 vs caf\u00e9", "東京タワーの夜景",
    "한국어 텍스트", "中文提示词：一只猫", "😀👍🏽 a cat 🐱", "👨\u200d👩\u200d👧\u200d👦 family", "🏳️‍🌈 flag",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &nbsp;", " ".join(["word"] * 500),
    " ".join(f"token{i} über-{i % 7}" for i in range(500)), "a  \t\n  b", "   leading and trailing   ",
    "\u00a0nbsp\u2003em\u3000ideographic", "x\u2028y\u2029z\x85w", "a\x01b\x7fc\x1cd\x1fe\x0b", "tab\tnewline\nreturn\r",
    "a<|endoftext|>b", "<|startoftext|>x", "A <|STARTOFTEXT|> <|EndOfText|> x", "hello!world!! !!!", "it's they're we've "
    "I'm you'll he'd don't ''s -'s IT'S 'S", "ΟΔΟΣ ΣΑΣ İstanbul ǅ ß ẞ", "12345 ½ Ⅻ ٣ 1.5e-3 ①②", "...!!!???,,,;;;--__ ()[]{}<>",
    "Привет мир", "مرحبا بالعالم", "שלום", "नमस्ते दुनिया", "ภาษาไทย", "e\u0301\u0302 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗͕",
    "\ue000 private \U000e0001 tag \ufeff bom a\u200bb\u200dc", "ＡＢＣ１２３ ｆｕｌｌｗｉｄｔｈ", "ﬁ ligature ǆ Ǳ",
]


def test_tokenizer_ids_equal_the_python_runtime(lib, runtime, bundle):
    tok = ClipTokenizer.from_dir(bundle / "tokenizer")
    texts = [p.prompt for p in load_prompts()] + AWKWARD
    T = tok.max_length
    ids, mask, cut = (C.c_int32 * T)(), (C.c_int32 * T)(), C.c_int32()
    mismatches = []
    for text in texts:
        check(lib, lib.eclipse_tokenize(runtime.bundle, text.encode(), ids, mask, T, C.byref(cut)))
        want = tok([text])
        if list(ids) != want.input_ids[0].tolist() or list(mask) != want.attention_mask[0].tolist() \
                or bool(cut.value) != want.truncated[0]:
            mismatches.append(text)
    assert len(texts) > 660 and not mismatches, mismatches[:5]


def _variant(bundle: Path, dst: Path, scheduler_config: dict) -> Path:
    """A bundle sharing `bundle`'s graphs (hard links) with another scheduler_config.json."""
    dst.mkdir()
    for path in bundle.rglob("*"):
        rel = path.relative_to(bundle)
        if path.is_dir():
            (dst / rel).mkdir(exist_ok=True)
        elif rel.name not in ("manifest.json", "scheduler_config.json"):
            os.link(path, dst / rel)
    (dst / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["scheduler_config.json"] = file_entry(dst, "scheduler_config.json")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


SCHEDULER_VARIANTS = [
    {}, {"_class_name": "DDIMScheduler"}, {"timestep_spacing": "linspace"},
    {"timestep_spacing": "trailing", "steps_offset": 0}, {"beta_schedule": "scaled_linear", "clip_sample": False},
    {"beta_schedule": "squaredcos_cap_v2"}, {"variance_type": "fixed_small_log"}, {"variance_type": "fixed_large"},
    {"_class_name": "DDIMScheduler", "set_alpha_to_one": True},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0, "clip_sample": False},
    {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()}, {"num_train_timesteps": 500},
]


@pytest.mark.parametrize("i", range(len(SCHEDULER_VARIANTS)))
def test_schedule_and_coefficients_equal_numpy(lib, bundle, tmp_path, i):
    config = {**json.loads((bundle / "scheduler_config.json").read_text()), **SCHEDULER_VARIANTS[i]}
    b = C.c_void_p()
    check(lib, lib.eclipse_bundle_open(str(_variant(bundle, tmp_path / "b", config)).encode(), 0, C.byref(b)))
    try:
        for kind in (None, "ddpm", "ddim"):
            for steps in (1, 3, 7, 50, 333):
                sched = scheduler_from_config(config, kind)
                ts, ks = (C.c_int64 * steps)(), (StepCoefficients * steps)()
                status = lib.eclipse_schedule(b, SCHEDULERS[kind], steps, ts, ks)
                try:
                    sched.set_timesteps(steps)
                except SchedulerConfigError:
                    assert status == ERR_INVALID_ARGUMENT, (kind, steps)
                    continue
                assert status == 0, lib.eclipse_last_error()
                assert list(ts) == sched.timesteps.tolist(), (kind, steps)
                for t, k in zip(sched.timesteps, ks):
                    want = np.array(sched.step_coefficients(int(t)).astuple())
                    got = np.array([getattr(k, f) for f, _ in StepCoefficients._fields_])
                    finite = np.isfinite(want)
                    assert np.array_equal(np.isfinite(got), finite)
                    err = np.abs(got[finite] - want[finite]) / np.maximum(np.abs(want[finite]), 1e-30)
                    assert np.all((err <= 1e-6) | (got[finite] == want[finite])), (kind, steps, t, got, want)
    finally:
        lib.eclipse_bundle_free(b)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63, 2**64 - 1])
def test_noises_equal_the_python_ones(lib, seed):
    n = 4099  # odd: the last pair's sine is dropped
    for stream in (STREAM_PRIOR, STREAM_LATENTS, STREAM_STEPS):
        out = np.empty(n, np.float32)
        lib.eclipse_normals(seed, stream, out.ctypes.data_as(C.POINTER(C.c_float)), n)
        assert np.abs(out - standard_normal(seed, stream, (n,))).max() <= 1e-6


# --- bundle refusals ----------------------------------------------------------------------------

def _linked_copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst, copy_function=os.link)
    (dst / "manifest.json").unlink()
    shutil.copy(bundle / "manifest.json", dst / "manifest.json")  # edited by some cases: a real copy
    return dst


def _replace_with_copy(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link before writing
    path.write_bytes(data)


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _damage(case: str, root: Path, outside: Path) -> None:
    prior = root / "prior.onnx"
    data = prior.read_bytes()
    if case == "missing file":
        prior.unlink()
    elif case == "truncated":
        _replace_with_copy(prior, data[:-10])
    elif case == "altered":
        _replace_with_copy(prior, data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    elif case == "newer format":
        _edit_manifest(root, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    elif case == "unknown family":
        _edit_manifest(root, lambda m: m.update(family="stable-cascade"))
    elif case == "step graph outside":
        _edit_manifest(root, lambda m: m["step_graphs"].update(cfg="../outside/step.onnx"))
    elif case == "not a bundle":
        _edit_manifest(root, lambda m: m.update(format="something-else"))
    elif case == "no manifest":
        (root / "manifest.json").unlink()
    elif case == "broken manifest":
        (root / "manifest.json").write_text("{")
    elif case == "absolute path":
        _edit_manifest(root, lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64, "bytes": 1}}))
    elif case == "dot-dot path":
        (outside / "x.bin").write_bytes(b"x")
        _edit_manifest(root, lambda m: m["files"].update({"../outside/x.bin": file_entry(outside, "x.bin")}))
    elif case == "symlink out":
        (outside / "prior.onnx").write_bytes(data)
        prior.unlink()
        prior.symlink_to(outside / "prior.onnx")
    elif case == "symlinked directory out":
        shutil.move(str(root / "tokenizer"), str(outside / "tokenizer"))
        (root / "tokenizer").symlink_to(outside / "tokenizer", target_is_directory=True)
    elif case == "unlisted file":
        _edit_manifest(root, lambda m: m["files"].pop("scheduler_config.json"))
    elif case == "graph outside":
        _edit_manifest(root, lambda m: m["components"]["prior"].update(graph="../outside/prior.onnx"))
    else:
        raise AssertionError(case)


REFUSALS = {
    "missing file": "missing prior.onnx", "truncated": "has \\d+ bytes, manifest says", "altered": "was altered",
    "newer format": "newer than this runtime reads", "not a bundle": "not an eclipse-export bundle",
    "no manifest": "has no manifest.json", "broken manifest": "unreadable",
    "absolute path": "files entry '/etc/hostname' is absolute",
    "dot-dot path": "files entry '../outside/x.bin' is not a plain relative path",
    "symlink out": "prior.onnx resolves outside the bundle",
    "symlinked directory out": "tokenizer/tokenizer.json resolves outside the bundle",
    "unlisted file": "required file \"scheduler_config.json\" is not one of the manifest's files",
    "graph outside": "components.prior.graph \"../outside/prior.onnx\" is not one of the manifest's files",
    "unknown family": "model family 'stable-cascade' is not known to this version of eclipse-export \\(it knows "
                      "kandinsky22, lambda, karlo\\)",
    "step graph outside": "step_graphs.cfg \"../outside/step.onnx\" is not one of the manifest's files",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bundle_refusal_matrix(lib, bundle, tmp_path, case):
    root, outside = _linked_copy(bundle, tmp_path / "bundle"), tmp_path / "outside"
    outside.mkdir()
    _damage(case, root, outside)
    b = C.c_void_p()
    assert lib.eclipse_bundle_open(str(root).encode(), 1, C.byref(b)) == ERR_BUNDLE and not b
    message = lib.eclipse_last_error().decode()
    assert re.search(REFUSALS[case], message), message
    with pytest.raises(BundleError):  # the same rule in both runtimes
        open_bundle(root)


def test_not_a_directory_and_size_only_check(lib, bundle, tmp_path):
    b = C.c_void_p()
    assert lib.eclipse_bundle_open(str(bundle / "manifest.json").encode(), 1, C.byref(b)) == ERR_BUNDLE
    assert b"does not exist or is not a directory" in lib.eclipse_last_error()
    root = _linked_copy(bundle, tmp_path / "bundle")
    _damage("altered", root, tmp_path)
    check(lib, lib.eclipse_bundle_open(str(root).encode(), 0, C.byref(b)))  # sizes only: same size passes
    lib.eclipse_bundle_free(b)


# --- ONNX Runtime backend and the example program ------------------------------------------------

def _bin_dir() -> Path:
    return Path(os.environ.get("ECLIPSE_BIN_DIR") or ROOT / "build" / "cpp")


def test_onnxruntime_backend_or_a_clear_refusal(lib, bundle, python):
    if lib.eclipse_backend_available(b"onnxruntime"):
        rt = Runtime(lib, bundle, ort_backend=True, verify_hashes=False)
        try:
            got = rt.generate("a red cube on a blue sphere", seed=8, negative_prompt="fog")["image"]
        finally:
            rt.close()
        want = python_image(python, "a red cube on a blue sphere", negative_prompt="fog", seed=8)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    else:
        backend = C.c_void_p()
        assert lib.eclipse_backend_onnxruntime_create(None, C.byref(backend)) == ERR_UNSUPPORTED
        assert b"-DECLIPSE_WITH_ONNXRUNTIME=ON" in lib.eclipse_last_error()


def test_example_program(lib, bundle, python, tmp_path):
    exe = _bin_dir() / "eclipse-generate-cpp"
    assert exe.is_file(), f"{exe} is not built (make cpp)"

    def run(*args):
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)

    usage = run("--prompt", "x")
    assert usage.returncode == 2 and usage.stderr.strip().endswith("error: --bundle is required")
    bad = run("--bundle", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: bundle ") and "Traceback" not in bad.stderr
    out = tmp_path / "o.png"
    args = ["--bundle", str(bundle), "--prompt", "a red cube", "--negative-prompt", "", "--height", "64", "--width",
            "128", "--steps", "3", "--guidance", "4", "--seed", "9", "--scheduler", "ddim", "--out", str(out)]
    done = run(*args)
    if not lib.eclipse_backend_available(b"onnxruntime"):
        assert done.returncode == 2 and "built without ONNX Runtime" in done.stderr and not out.exists()
        return
    assert done.returncode == 0, done.stderr
    from PIL import Image

    got = np.asarray(Image.open(out).convert("RGB"))
    want = python_image(python, "a red cube", "", 64, 128, 3, 4.0, 9, "ddim")
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert "latency:" in done.stderr


# --- the same tests under AddressSanitizer + UndefinedBehaviorSanitizer ---------------------------

@pytest.mark.skipif(SANITIZER_CHILD, reason="this is the sanitizer run itself")
def test_under_address_and_undefined_behavior_sanitizers(bundle):
    done, tail = run_module_under_sanitizers(__file__, ECLIPSE_TEST_BUNDLE=str(bundle))
    assert done.returncode == 0 and "passed" in done.stdout, tail


# --- fuzzed manifests (the same mutations as tests/test_fuzz.py) ----------------------------------

def test_mutated_manifests_never_crash_the_library(lib, bundle, tmp_path):
    """Each mutated manifest gives a bundle/unsupported status or a working context, never a
    crash or an internal error; and whatever the Python runtime refuses, the C library refuses."""
    from hypothesis import given, settings

    from .test_fuzz import FUZZ, FUZZ_EXAMPLES, mutated_manifests

    root = tmp_path / "bundle"
    shutil.copytree(bundle, root, copy_function=os.link)
    (root / "manifest.json").unlink()
    valid = json.loads((bundle / "manifest.json").read_text())
    graphs = OrtGraphs(reuse_sessions=True)
    backend = C.c_void_p()
    check(lib, lib.eclipse_backend_custom_create(C.byref(graphs.table), C.byref(backend)))
    outcomes = {"refused": 0, "ran": 0}

    # fewer cases than test_fuzz.py: every accepted one loads four graphs (this runs twice, once
    # under the sanitizers)
    @settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 5))
    @given(mutated_manifests(valid))
    def case(manifest):
        (root / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
        try:
            open_bundle(root, verify_hashes=False)
            python_refuses = False
        except BundleError:
            python_refuses = True
        b, ctx = C.c_void_p(), C.c_void_p()
        status = lib.eclipse_bundle_open(str(root).encode(), 0, C.byref(b))
        assert status in (0, ERR_BUNDLE, ERR_UNSUPPORTED), lib.eclipse_last_error()
        assert status != 0 or not python_refuses, "the C library accepted a manifest the Python runtime refuses"
        if status != 0:
            outcomes["refused"] += 1
            return
        try:
            status = lib.eclipse_context_create(b, backend, C.byref(ctx))
            assert status in (0, ERR_BUNDLE, ERR_UNSUPPORTED, ERR_BACKEND), lib.eclipse_last_error()
            if status == 0:
                rt = Runtime.__new__(Runtime)
                rt.lib, rt.context = lib, ctx
                try:
                    rt.generate("a cat", steps=1)
                    outcomes["ran"] += 1
                except EclipseError as e:
                    assert e.status in (ERR_BUNDLE, ERR_UNSUPPORTED, ERR_BACKEND), e
                    outcomes["refused"] += 1
        finally:
            lib.eclipse_context_free(ctx)
            lib.eclipse_bundle_free(b)

    try:
        case()
    finally:
        lib.eclipse_backend_free(backend)
    print(f"C manifest fuzz: {outcomes}")


def test_crafted_external_data_is_refused_exactly_as_in_python(lib, bundle, tmp_path):
    """The graph-level mutations of tests/test_fuzz.py (rewritten external-data references,
    re-hashed in the manifest): the C library opens exactly the bundles the Python runtime opens,
    refuses the others with a bundle status, and never crashes (also run under the sanitizers)."""
    from hypothesis import given, settings

    from .test_fuzz import FUZZ, FUZZ_EXAMPLES, apply_graph_mutation, graph_mutations, restore
    from .test_onnx_refs import linked_copy, make_external

    root = linked_copy(bundle, tmp_path / "bundle")
    make_external(root, "prior")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(os.urandom(1 << 16))
    (root / "link.bin").symlink_to(outside / "secret.bin")
    shutil.copy(root / "prior.onnx.data", root / "stolen.bin")
    graph, manifest = (root / "prior.onnx").read_bytes(), (root / "manifest.json").read_text()
    outcomes = {"refused": 0, "opened": 0}

    @settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 2))
    @given(graph_mutations())
    def case(edits):
        restore(root, graph, manifest)
        apply_graph_mutation(root, edits, outside)
        try:
            open_bundle(root, verify_hashes=False)
            python_refuses = False
        except BundleError:
            python_refuses = True
        b = C.c_void_p()
        status = lib.eclipse_bundle_open(str(root).encode(), 0, C.byref(b))
        lib.eclipse_bundle_free(b)
        assert status in (0, ERR_BUNDLE), lib.eclipse_last_error()
        assert (status == ERR_BUNDLE) == python_refuses, (edits, lib.eclipse_last_error())
        if status:
            assert b"the prior graph prior.onnx cannot be loaded" in lib.eclipse_last_error()
        outcomes["refused" if status else "opened"] += 1

    case()
    print(f"C graph fuzz: {outcomes}")
    assert outcomes["refused"] and outcomes["opened"]


@pytest.mark.skipif(SANITIZER_CHILD, reason="compiles against the plain build")
def test_readme_c_example_compiles_and_runs(lib, bundle, tmp_path):
    """README's "Embedding in C/C++" example, as printed, against the built library."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Embedding in C/C++"):]
    source = section[section.index("```c\n") + 5:]
    (tmp_path / "app.c").write_text(source[:source.index("```")])
    build = Path(os.environ.get("ECLIPSE_LIB") or ROOT / "build" / "cpp" / "libeclipse.so").resolve().parent
    cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "-I", str(ROOT / "cpp" / "include"), "app.c", "-o", "app",
                         "-L", str(build), "-leclipse", f"-Wl,-rpath,{build}"], cwd=tmp_path, capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "tiny-onnx").symlink_to(bundle)
    run = subprocess.run(["./app"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if lib.eclipse_backend_available(b"onnxruntime"):
        assert run.returncode == 0 and (tmp_path / "out.png").stat().st_size > 0, run.stderr
    else:
        assert run.returncode == 1 and run.stderr.startswith("error: this eclipse library was built without ONNX Runtime")
