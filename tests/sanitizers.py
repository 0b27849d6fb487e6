"""Run a C-library test module a second time against the AddressSanitizer + UBSan build
(build/cpp-asan), in a child pytest that loads the sanitized libeclipse through ctypes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# set in the child: the module's own sanitizer test skips there
SANITIZER_CHILD = os.environ.get("ECLIPSE_SANITIZER_CHILD") == "1"


def run_module_under_sanitizers(module_file: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, str]:
    """The child's result and the tail of its output; skips when the ASan build is missing."""
    asan_dir = Path(os.environ.get("ECLIPSE_ASAN_DIR") or ROOT / "build" / "cpp-asan")
    asan_lib = asan_dir / "libeclipse.so"
    if not asan_lib.is_file():
        pytest.skip(f"{asan_lib} is not built (make cpp-asan; make test builds it)")
    # the ASan runtime must come first; libstdc++ too, or ASan cannot intercept C++ throws from a
    # Python process that loaded no C++ before it started
    preload = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
               for name in ("libasan.so", "libstdc++.so.6")]
    env = dict(os.environ, ECLIPSE_LIB=str(asan_lib), ECLIPSE_BIN_DIR=str(asan_dir), ECLIPSE_SANITIZER_CHILD="1",
               LD_PRELOAD=" ".join(preload), **env_extra,
               # Python itself does not free everything at exit: leaks are checked in the C++ test binary
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", module_file],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    tail = (done.stdout + done.stderr)[-4000:]
    assert "runtime error:" not in done.stderr and "AddressSanitizer" not in done.stderr, tail
    return done, tail
