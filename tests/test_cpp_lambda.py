"""The C library's λ-ECLIPSE chain and its API 2 inputs (issue 19 items 8-9, issue 20 item 6):
subjects and an edge image as files or RGB8 buffers give the Python runtime's pixels for the same
seed; the bad inputs are refused with the Python runtime's words; every Karlo noise can be
injected, giving the Python runtime's image on the same noises. `make test` runs this module a
second time against the AddressSanitizer + UBSan library (build/cpp-asan)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclipse_export.runtime.request import GenerationError
from eclipse_export.verify.cpp import (
    ERR_BACKEND,
    ERR_INVALID_ARGUMENT,
    ROOT,
    EclipseError,
    OrtGraphs,
    Runtime,
    load_library,
)

from .sanitizers import SANITIZER_CHILD, run_module_under_sanitizers

KW = dict(height=64, width=64, steps=3, seed=7)


@pytest.fixture(scope="module")
def lib():
    try:
        return load_library()
    except (OSError, FileNotFoundError) as e:
        pytest.skip(f"build/cpp is not built ({e}); make test builds it")


def _given(request, env: str, fixture: str) -> Path:
    given = os.environ.get(env)  # the sanitizer run reuses the parent's bundles
    return Path(given) if given else request.getfixturevalue(fixture)


@pytest.fixture(scope="module")
def lambda_bundle(request) -> Path:
    return _given(request, "ECLIPSE_TEST_LAMBDA_BUNDLE", "tiny_lambda_bundle")


@pytest.fixture(scope="module")
def plain_bundle(request) -> Path:
    return _given(request, "ECLIPSE_TEST_BUNDLE", "tiny_bundle")


@pytest.fixture(scope="module")
def karlo_bundle(request) -> Path:
    return _given(request, "ECLIPSE_TEST_KARLO_BUNDLE", "tiny_karlo_bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """A wide RGB subject, an RGBA one (transparent left third: composited on white), a grey
    16-bit one, an edge map; as PNG files and the arrays the Python runtime decodes them to."""
    d = tmp_path_factory.mktemp("subjects")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:180, 0:140]
    Image.fromarray(np.stack([x, y, (x + y) % 256], -1).astype(np.uint8)).save(d / "dog.png")
    hat = np.dstack([rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), np.full((90, 120), 255, np.uint8)])
    hat[:, :30, 3] = 0
    hat[:, 30:40, 3] = 100
    Image.fromarray(hat, "RGBA").save(d / "hat.png")
    Image.fromarray(((x * 400 + y * 7) % 65536).astype(np.uint16)).save(d / "grey16.png")
    edges = np.zeros((128, 128, 3), np.uint8)
    edges[40:90, 60] = 255
    edges[40, 30:100] = 255
    Image.fromarray(edges).save(d / "edges.png")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    return {k: d / f"{k}.png" for k in ("dog", "hat", "grey16", "edges", "empty", "text")} | {"dir": d}


@pytest.fixture(scope="module")
def lambda_python(lambda_bundle):
    from eclipse_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(lambda_bundle)


@pytest.fixture(scope="module")
def graphs():
    return OrtGraphs()  # its ctypes callbacks must outlive the library objects that call them


@pytest.fixture(scope="module")
def lambda_cpp(lib, lambda_bundle, graphs):
    rt = Runtime(lib, lambda_bundle, graphs.table)
    yield rt
    rt.close()


# --- λ-ECLIPSE: same seed, same pixels -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["files", "edges", "buffers", "grey16-ddim", "no-cfg"])
def test_lambda_same_pixels_as_python(lambda_python, lambda_cpp, images, case):
    prompt = "a dog wearing a hat"
    subjects = [(images["dog"], "dog"), (images["hat"], "hat")]
    kw, control = dict(KW), None
    if case == "edges":
        control = images["edges"]
    elif case == "buffers":  # RGB8 and RGBA8 arrays in memory, rows not packed (a view into a wider image)
        dog = np.asarray(Image.open(images["dog"]).convert("RGB"))
        wide = np.zeros((dog.shape[0], dog.shape[1] + 13, 3), np.uint8)
        wide[:, 5:5 + dog.shape[1]] = dog
        hat = np.asarray(Image.open(images["hat"]))
        subjects = [(wide[:, 5:5 + dog.shape[1]], "dog"), (hat, "hat")]
        control = np.asarray(Image.open(images["edges"]).convert("RGB"))
    elif case == "grey16-ddim":
        subjects, kw["scheduler"] = [(images["grey16"], "dog")], "ddim"
    elif case == "no-cfg":
        subjects, kw["guidance_scale"], prompt = [(images["hat"], "hat"), (images["dog"], "hat")], 1.0, "a hat"
    want = lambda_python.generate(prompt, subjects=subjects, control_image=control, **kw)
    got = lambda_cpp.generate(prompt, subjects=subjects, control_image=control, **kw)
    np.testing.assert_array_equal(got["image"], want.images[0])
    assert got["warnings"] == want.warnings
    assert got["timings"]["image_encoder"] >= 0


@pytest.mark.slow
def test_lambda_warnings_and_injected_noises_match_python(lambda_python, lambda_cpp, images):
    from eclipse_export.runtime.request import Request

    subjects = [(images["dog"], "dog"), (images["hat"], "hat")]
    want = lambda_python.generate("a hat on a hat", subjects=subjects, **KW)
    assert want.warnings == ["the subject keyword 'dog' is not in the prompt: its image is unused"]
    got = lambda_cpp.generate("a hat on a hat", subjects=subjects, **KW)
    assert got["warnings"] == want.warnings
    np.testing.assert_array_equal(got["image"], want.images[0])
    # the noises of seed 9 injected into a seed-7 request: seed 9's image
    req, _ = Request.make("a dog", subjects=[(images["dog"], "dog")], **{**KW, "seed": 9})
    noises = lambda_python.chain.noises_for(req)
    want = lambda_python.run(req)
    named = {"prior": noises.prior, "latents": noises.latents, "steps": noises.steps}
    got = lambda_cpp.generate("a dog", subjects=[(images["dog"], "dog")], named_noises=named, **KW)
    np.testing.assert_array_equal(got["image"], want.images[0])
    with pytest.raises(EclipseError, match="injected noise 'sr_latents' is not drawn by λ-ECLIPSE"):
        lambda_cpp.generate("a dog", subjects=[(images["dog"], "dog")], named_noises={"sr_latents": noises.latents}, **KW)


# --- the bad inputs: refused with the Python runtime's words --------------------------------------

def _python_error(pipe, prompt, **kw) -> str:
    with pytest.raises(GenerationError) as e:
        pipe.generate(prompt, **{**KW, "steps": 1, **kw})
    return str(e.value)


def _cpp_error(rt, prompt, **kw) -> str:
    with pytest.raises(EclipseError) as e:
        rt.generate(prompt, **{**KW, "steps": 1, **kw})
    assert e.value.status == ERR_INVALID_ARGUMENT and "\n" not in e.value.message
    return e.value.message


@pytest.mark.slow
def test_lambda_bad_inputs_are_refused_as_python_refuses_them(lambda_python, lambda_cpp, images):
    dog, edges = images["dog"], images["edges"]
    missing = images["dir"] / "missing.png"
    cases = [
        dict(subjects=[(missing, "dog")]),
        dict(subjects=[(dog, "dog"), (images["empty"], "hat")]),
        dict(subjects=[(dog, "dog")], control_image=missing),
        dict(subjects=[(dog, "  ")]),
        dict(subjects=[(np.zeros((0, 5, 3), np.uint8), "dog")]),
        dict(),  # a λ bundle needs a subject (as the Python runtime says)
        dict(subjects=[(dog, "dog")], negative_prompt="blurry"),
    ]
    for kw in cases:
        assert _cpp_error(lambda_cpp, "a dog", **kw) == _python_error(lambda_python, "a dog", **kw), kw
    # Pillow's and libpng's reasons differ; the words before them do not
    kw = dict(subjects=[(images["text"], "dog")])
    prefix = f"subject image 1 (dog) {images['text']}: not a readable image ("
    assert _python_error(lambda_python, "a dog", **kw).startswith(prefix)
    assert _cpp_error(lambda_cpp, "a dog", **kw).startswith(prefix)


@pytest.mark.slow
def test_plain_bundles_refuse_subjects_as_python_does(lib, plain_bundle, karlo_bundle, images, graphs):
    from eclipse_export.runtime.pipeline import Pipeline

    for bundle, size in ((plain_bundle, 64), (karlo_bundle, 64)):
        python = Pipeline.from_bundle(bundle)
        rt = Runtime(lib, bundle, graphs.table)
        try:
            for kw in (dict(subjects=[(images["dog"], "dog")]), dict(control_image=images["edges"])):
                kw.update(height=size, width=size)
                message = _cpp_error(rt, "a dog", **kw)
                assert message == _python_error(python, "a dog", **kw)
                assert "plain ECLIPSE" in message and "takes no subject or control images" in message
        finally:
            rt.close()


# --- Karlo: every noise injected -----------------------------------------------------------------

@pytest.mark.slow
def test_karlo_with_injected_noises_equals_python_on_the_same_noises(lib, karlo_bundle, graphs):
    from eclipse_export.runtime.pipeline import Pipeline
    from eclipse_export.runtime.request import Request

    python = Pipeline.from_bundle(karlo_bundle)
    rt = Runtime(lib, karlo_bundle, graphs.table)
    try:
        kw = dict(height=64, width=64, steps=4, guidance_scale=8.0)
        req, _ = Request.make("a red frog", seed=5, **kw)
        noises = python.chain.noises_for(req)
        # different noises than seed 5 draws (so injection is what makes the image equal)
        rng = np.random.default_rng(3)
        noises = type(noises)(**{k: rng.standard_normal(getattr(noises, k).shape).astype(np.float32)
                                 for k in ("prior", "latents", "steps", "sr_latents", "sr_steps")})
        want = python.run(req, noises=noises).images[0]
        named = {k: getattr(noises, k) for k in ("prior", "latents", "steps", "sr_latents", "sr_steps")}
        got = rt.generate("a red frog", seed=5, named_noises=named, **kw)["image"]
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, rt.generate("a red frog", seed=5, **kw)["image"])
        # the API 1 fields still inject the first three
        got = rt.generate("a red frog", seed=5, noises=noises, named_noises={"sr_latents": noises.sr_latents,
                                                                               "sr_steps": noises.sr_steps}, **kw)
        np.testing.assert_array_equal(got["image"], want)
        with pytest.raises(EclipseError, match=r"injected noises do not fit: super-resolution step noise has 3 values"):
            rt.generate("a red frog", seed=5, named_noises={"sr_steps": np.zeros(3, np.float32)}, **kw)
    finally:
        rt.close()


# --- the example program -------------------------------------------------------------------------

def test_example_program_subject_flags(lib, images, tmp_path):
    example = Path(os.environ.get("ECLIPSE_BIN_DIR") or ROOT / "build" / "cpp") / "eclipse-generate-cpp"
    if not example.is_file():
        pytest.skip(f"{example} is not built")

    def run(*args):
        return subprocess.run([str(example), "--bundle", str(tmp_path), "--prompt", "a dog", *args],
                              capture_output=True, text=True, timeout=60)

    for args, words in ((["--subject", str(images["dog"])], "expected IMAGE=KEYWORD"),
                        (["--subject", f"{images['dog']}= "], "expected IMAGE=KEYWORD"),
                        (["--canny", str(images["dog"])], "Canny edges are computed by the Python runtime only")):
        done = run(*args)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
        assert words in done.stderr and "Traceback" not in done.stderr


# --- the same tests under AddressSanitizer + UndefinedBehaviorSanitizer ---------------------------

@pytest.mark.slow
@pytest.mark.skipif(SANITIZER_CHILD, reason="this is the sanitizer run itself")
def test_under_address_and_undefined_behavior_sanitizers(lambda_bundle, plain_bundle, karlo_bundle):
    done, tail = run_module_under_sanitizers(__file__, ECLIPSE_TEST_BUNDLE=str(plain_bundle),
                                             ECLIPSE_TEST_LAMBDA_BUNDLE=str(lambda_bundle),
                                             ECLIPSE_TEST_KARLO_BUNDLE=str(karlo_bundle))
    assert done.returncode == 0, tail
    # every test of this module but this one ran on the sanitized library (none skipped for a missing build)
    summary = re.search(r"(\d+) passed, 1 skipped in", done.stdout)
    assert summary and int(summary.group(1)) >= 10, tail


def test_readme_lambda_c_example_compiles(lib, tmp_path):
    """The C fragment of README's "Subject-driven generation (λ-ECLIPSE)", in a main(), compiles
    and links warning-free against eclipse.h and the built library."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Subject-driven generation (λ-ECLIPSE)"):readme.index("## Embedding in C/C++")]
    fragment = section[section.index("```c\n") + 5:]
    fragment = fragment[:fragment.index("```")]
    (tmp_path / "app.c").write_text(
        "#include <stdint.h>\n#include <eclipse/eclipse.h>\nstatic const uint8_t hat_rgba[120 * 90 * 4];\n"
        "int main(void) {\n    eclipse_bundle *bundle = 0; eclipse_state *state = 0; eclipse_result *image = 0;\n"
        + fragment + "    eclipse_result_free(image);\n    return s != ECLIPSE_OK;\n}\n")
    build = Path(os.environ.get("ECLIPSE_LIB") or ROOT / "build" / "cpp" / "libeclipse.so").resolve().parent
    cc = subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "cpp" / "include"), "app.c",
                         "-o", "app", "-L", str(build), "-leclipse", f"-Wl,-rpath,{build}"], cwd=tmp_path,
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    # a NULL state: the call is refused, proving the program runs against the library
    run = subprocess.run(["./app"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1


WRAPPER_APP = r"""
#include <cstdio>
#include <eclipse/eclipse.hpp>
// a backend that loads anything and runs nothing: what reaches the graphs is not the point here
static int load(void *, const char *, const char *, void **session) { *session = &session; return 0; }
static int run(void *, void *, const eclipse_tensor *, size_t, eclipse_tensor *, size_t) { return 1; }
static void free_session(void *, void *) {}
int main(int, char **argv) {
    eclipse_custom_backend table{};
    table.struct_size = sizeof table, table.name = "none", table.load = load, table.run = run;
    table.free_session = free_session;
    eclipse::Bundle bundle(argv[1], false);
    eclipse::Backend backend = eclipse::Backend::custom(table);
    eclipse::Context context(bundle, backend);
    eclipse::State state(context);
    eclipse::Params p = eclipse::default_params(bundle);
    p.height = p.width = 64, p.steps = 1;
    static const uint8_t rgba[2 * 3 * 4] = {0, 1, 2, 255, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21};
    p.subjects = {{eclipse::Image::file(argv[2]), "dog"}, {eclipse::Image::rgb8(rgba, 3, 2, 0, 4), "hat"}};
    p.control_image = eclipse::Image::file(argv[3]);
    try {
        state.generate("a dog in a hat", p);
    } catch (const eclipse::Error &e) {
        std::printf("%d %s\n", static_cast<int>(e.status()), e.what());
    }
    return 0;
}
"""


def test_cpp_wrapper_passes_subjects_and_the_control_image(lib, lambda_bundle, images, tmp_path):
    """eclipse.hpp's Params::subjects / control_image reach the library: a missing file is named,
    good images pass decoding and the request reaches the graphs (a backend that runs nothing)."""
    (tmp_path / "app.cpp").write_text(WRAPPER_APP)
    build = Path(os.environ.get("ECLIPSE_LIB") or ROOT / "build" / "cpp" / "libeclipse.so").resolve().parent
    cc = subprocess.run(["c++", "-std=c++17", "-Wall", "-Werror", "-I", str(ROOT / "cpp" / "include"), "app.cpp", "-o",
                         "app", "-L", str(build), "-leclipse", f"-Wl,-rpath,{build}"], cwd=tmp_path, capture_output=True,
                        text=True)
    assert cc.returncode == 0, cc.stderr
    missing = images["dir"] / "missing.png"

    def run(subject, control):
        done = subprocess.run(["./app", str(lambda_bundle), str(subject), str(control)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(missing, images["edges"]) == f"{ERR_INVALID_ARGUMENT} subject image 1 (dog) {missing}: no such file"
    assert run(images["dog"], missing) == f"{ERR_INVALID_ARGUMENT} control image {missing}: no such file"
    assert run(images["dog"], images["edges"]).startswith(f"{ERR_BACKEND} ")  # decoded, then the graphs were asked
