"""The C/C++ runtime as a user installs it (README "Embedding in C/C++"): `cmake --install` into a
prefix, then the installed example, pkg-config and the CMake package, each used from outside the
build tree with no LD_LIBRARY_PATH.

CI installs build/cpp (`make test` builds it). The ONNX Runtime build (build/cpp-ort) is checked
too where it was built: CI has no ONNX Runtime C headers (no registry it reaches ships them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from eclipse_export.verify.cpp import ROOT

BUILD = ROOT / "build" / "cpp"
BUILD_ORT = ROOT / "build" / "cpp-ort"

pytestmark = pytest.mark.skipif(os.environ.get("ECLIPSE_SANITIZER_CHILD") == "1",
                                reason="installs the plain build, not the sanitized one")

APP = r"""
#include <stdio.h>
#include <string.h>
#include <eclipse/eclipse.h>

int main(void) {
    /* a library call that needs the library's own dependencies at run time (utf8proc, libpng's
     * writer is not reached): the version and a refusal with its message */
    eclipse_bundle *b = NULL;
    eclipse_status s = eclipse_bundle_open("/nonexistent-bundle", 0, &b);
    printf("%s %d %s\n", eclipse_version(), s == ECLIPSE_ERR_BUNDLE, strlen(eclipse_last_error()) > 0 ? "msg" : "none");
    return 0;
}
"""


def _env():
    """The environment without anything that would find the library for the programs."""
    env = dict(os.environ)
    for name in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PKG_CONFIG_PATH", "CMAKE_PREFIX_PATH"):
        env.pop(name, None)
    return env


def _install(build: Path, prefix: Path) -> Path:
    if not (build / "libeclipse.so").is_file():
        pytest.skip(f"{build} is not built (make cpp; make test builds it)")
    done = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    libdirs = [d for d in prefix.iterdir() if (d / "pkgconfig" / "eclipse.pc").is_file()]
    libdirs += [d for d in prefix.glob("lib/*") if (d / "pkgconfig" / "eclipse.pc").is_file()]
    assert len(libdirs) == 1, list(prefix.rglob("eclipse.pc"))
    return libdirs[0]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prefix")
    return root, _install(BUILD, root)


def _runpath(exe: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.*)\]", out)
    return found[0].split(":") if found else []


def test_installed_example_finds_the_installed_library(prefix):
    root, libdir = prefix
    exe = root / "bin" / "eclipse-generate-cpp"
    runpath = _runpath(exe)
    # relative to the program: the prefix can move; nothing of the build tree is left in it
    assert runpath == [f"$ORIGIN/../{libdir.relative_to(root)}"], runpath
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, env=_env()).stdout
    found = re.search(r"libeclipse\.so\.0 => (\S+)", ldd)
    assert found and Path(found.group(1)).resolve() == (libdir / "libeclipse.so.0").resolve(), ldd
    usage = subprocess.run([str(exe), "--prompt", "x"], capture_output=True, text=True, env=_env(), timeout=60)
    assert usage.returncode == 2 and usage.stderr.strip().endswith("error: --bundle is required"), usage.stderr


def _pkg_config(libdir: Path, *args: str) -> list[str]:
    env = dict(_env(), PKG_CONFIG_PATH=str(libdir / "pkgconfig"))
    done = subprocess.run(["pkg-config", *args, "eclipse"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _run_app(exe: Path) -> str:
    done = subprocess.run([str(exe)], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pkg_config_links_a_c_program_to_the_shared_and_the_static_library(prefix, tmp_path):
    root, libdir = prefix
    (tmp_path / "app.c").write_text(APP)
    version = _pkg_config(libdir, "--modversion")[0]

    shared = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "app.c", "-o", "app-shared",
                             *_pkg_config(libdir, "--cflags", "--libs"), f"-Wl,-rpath,{libdir}"],
                            cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert shared.returncode == 0, shared.stderr
    assert _run_app(tmp_path / "app-shared").split() == [version, "1", "msg"]

    # static: a prefix holding only libeclipse.a, so that -leclipse can only mean it; the private
    # libraries the .pc lists (--static) must be all a C program needs (libstdc++, libm, ...)
    static_root = tmp_path / "static-prefix"
    shutil.copytree(root, static_root, symlinks=True)
    static_libdir = static_root / libdir.relative_to(root)
    for so in static_libdir.glob("libeclipse.so*"):
        so.unlink()
    static = subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "app.c", "-o", "app-static",
                             *_pkg_config(static_libdir, "--static", "--cflags", "--libs")],
                            cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert static.returncode == 0, static.stderr
    ldd = subprocess.run(["ldd", str(tmp_path / "app-static")], capture_output=True, text=True).stdout
    assert "libeclipse" not in ldd, ldd
    assert _run_app(tmp_path / "app-static").split() == [version, "1", "msg"]


CONSUMER = """
cmake_minimum_required(VERSION 3.22)
project(app C)  # a C program, also with the static library (C++ inside)
find_package(eclipse REQUIRED {components})
add_executable(app app.c)
target_link_libraries(app PRIVATE {target})
"""

# what a machine without the dev packages of the static library's dependencies looks like to CMake
NO_STATIC_DEPS = ["-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON", "-DCMAKE_DISABLE_FIND_PACKAGE_PNG=ON",
                  "-DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON"]


def _consumer(root: Path, where: Path, components: str, target: str, *flags: str):
    where.mkdir()
    (where / "app.c").write_text(APP)
    (where / "CMakeLists.txt").write_text(CONSUMER.format(components=components, target=target))
    configure = subprocess.run(["cmake", "-S", str(where), "-B", str(where / "build"), f"-DCMAKE_PREFIX_PATH={root}",
                                *flags], capture_output=True, text=True, env=_env())
    return configure


@pytest.mark.parametrize("static", [False, True], ids=["shared", "static"])
def test_cmake_package(prefix, tmp_path, static):
    root, _ = prefix
    components, target = ("COMPONENTS static", "eclipse::eclipse_static") if static else ("", "eclipse::eclipse")
    if static:
        # the static component names what is missing instead of failing somewhere in CMake
        refused = _consumer(root, tmp_path / "refused", components, target, *NO_STATIC_DEPS)
        assert refused.returncode != 0
        assert "eclipse::eclipse_static (COMPONENTS static) needs OpenSSL's libcrypto (libssl-dev), libpng" in \
            " ".join(refused.stderr.split()), refused.stderr
        flags = []
    else:
        # the shared library needs none of them (its dependencies are linked into it)
        flags = NO_STATIC_DEPS
    configure = _consumer(root, tmp_path / "app", components, target, *flags)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path / "app" / "build")], capture_output=True, text=True,
                           env=_env())
    assert build.returncode == 0, build.stdout + build.stderr
    exe = tmp_path / "app" / "build" / "app"
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert ("libeclipse" in ldd) != static, ldd
    # CMake gives the shared-library consumer a build RPATH to the prefix: it runs as built
    assert _run_app(exe).split()[1:] == ["1", "msg"]


def test_installed_onnxruntime_example_gives_the_python_image(request, tmp_path):
    """README's C/C++ sequence ends here: the ONNX Runtime build, installed, run on a bundle."""
    if not (BUILD_ORT / "libeclipse.so").is_file():
        pytest.skip(f"{BUILD_ORT} is not built: ONNX Runtime's C headers are not in CI (neither PyPI nor Debian "
                    "ships them); make cpp-ort with the headers in cpp/third_party/onnxruntime/include (README)")
    tiny_bundle, tiny_pipeline = request.getfixturevalue("tiny_bundle"), request.getfixturevalue("tiny_pipeline")
    from PIL import Image

    from eclipse_export.runtime.pipeline import Request

    root = tmp_path / "prefix"
    _install(BUILD_ORT, root)
    out = tmp_path / "out.png"
    args = ["--bundle", str(tiny_bundle), "--prompt", "a red cube", "--height", "64", "--width", "64", "--steps", "3",
            "--guidance", "4", "--seed", "4", "--out", str(out)]
    done = subprocess.run([str(root / "bin" / "eclipse-generate-cpp"), *args], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    got = np.asarray(Image.open(out).convert("RGB"))
    want = tiny_pipeline.run(Request(("a red cube",), None, 64, 64, 3, 4.0, 4, None)).images[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
