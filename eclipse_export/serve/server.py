"""Start tritonserver on a repository written by `--target triton`, wait until it is ready, and
stop it cleanly.

Which server: an explicit binary, else the one inside the `nvidia-pytriton` wheel (tritonserver
2.51 with the Python backend only), else `tritonserver` on PATH (NVIDIA's containers, a system
install); none of them: `docker_command` gives the line for NVIDIA's container.

Facts this module handles (measured, see docs/decisions.md "Serving"):
- The wheel's Python-backend stub links libpython by soname. With an interpreter that is not the
  system's (pyenv, conda, a venv of either) it must find that interpreter's own libpython first,
  or models fail to load (`'_thread.RLock' object has no attribute '_recursion_count'`): the
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH, then the wheel's bundled libraries.
- The stub runs the models with that interpreter's sys.path; PYTHONPATH gives it this process's
  site-packages and this package, so the served code is the installed eclipse-export.
- The wheel keeps its stubs per Python version outside the backend folder: the server gets a
  private backend folder (links into the wheel) with the stub of this interpreter's version.
- SIGINT is tritonserver's clean shutdown (it unloads models, and the Python backend removes its
  shared-memory regions); SIGTERM left regions in /dev/shm and a workspace behind. A process
  started from a non-interactive shell inherits SIGINT as *ignored*, so the child resets it to
  the default and unblocks it before exec, and runs in its own session so that a terminal's
  Ctrl-C reaches only this launcher, which then sends the one SIGINT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import eclipse_export

CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the pytriton wheel's server
JETSON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3-igpu"
SHM_DIR = Path("/dev/shm")


class ServerError(RuntimeError):
    """The server could not be found, started or made ready (the message says why)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # the folder holding python/ (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path | None  # a stub for this interpreter, when not already inside backends/python
    libs: tuple[Path, ...] = ()  # extra library folders for the loader
    origin: str = "system"


@dataclass(frozen=True)
class ModelPython:
    """The interpreter (and so the environment) the Python-backend models run in."""

    executable: Path
    version: str  # "3.11"
    libdir: Path | None  # where its libpython is, when it has a shared one
    numpy: str | None
    pytriton: Path | None  # the nvidia-pytriton wheel's package folder in that environment

    @staticmethod
    def probe(executable: str | Path | None = None) -> "ModelPython":
        executable = Path(executable or sys.executable)
        script = ("import sys, sysconfig, os, json\n"
                  "d, l = sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('LDLIBRARY')\n"
                  "try:\n    import numpy; n = numpy.__version__\nexcept ImportError:\n    n = None\n"
                  "import importlib.util as u\ns = u.find_spec('pytriton')\n"  # found, not imported
                  "t = list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else None\n"
                  "print(json.dumps({'v': '%d.%d' % sys.version_info[:2], "
                  "'lib': d if d and l and os.path.exists(os.path.join(d, l)) else None, 'numpy': n, 't': t}))")
        try:
            out = subprocess.run([str(executable), "-c", script], capture_output=True, text=True, timeout=60, check=True)
            info = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
            raise ServerError(f"--python {executable}: cannot run it ({e})") from None
        return ModelPython(executable, info["v"], Path(info["lib"]) if info["lib"] else None, info["numpy"],
                           Path(info["t"]) if info["t"] else None)


def _pytriton_install(python: ModelPython) -> TritonInstall | None:
    # the wheel installed with the models' environment (`pip install eclipse-export[serve]`)
    if python.pytriton is None:
        return None
    root = python.pytriton / "tritonserver"
    binary = root / "bin" / "tritonserver"
    stub = root / "python_backend_stubs" / python.version / "triton_python_backend_stub"
    if not binary.is_file():
        return None
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {python.version} "
                          f"({stub.parent.parent})")
    # The wheel's stub (Triton 2.51) reads numpy arrays through a pybind11 that predates NumPy 2's
    # array-descriptor layout: under NumPy 2 every tensor arrives garbled (measured: [1, 2, 3] in,
    # [1, 1, 1] seen; BYTES inputs crash the stub). nvidia-pytriton itself requires numpy < 2.
    if python.numpy and int(python.numpy.split(".")[0]) >= 2:
        raise ServerError(f"the models would run under NumPy {python.numpy} ({python.executable}); the "
                          "nvidia-pytriton wheel's Triton 2.51 Python backend needs numpy < 2: serve from an "
                          "environment made with pip install 'eclipse-export[serve]' (it pins numpy < 2), or pass "
                          "--python with such an environment's interpreter (README: Serving)")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, root / "backends", stub, (libs,) if libs.is_dir() else (), "nvidia-pytriton wheel")


def find_tritonserver(explicit: str | Path | None = None, python: ModelPython | None = None) -> TritonInstall | None:
    if explicit:
        binary = Path(explicit)
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise ServerError(f"--tritonserver {binary}: not an executable file")
        return TritonInstall(binary, _system_backends(binary), None, (), "given")
    found = _pytriton_install(python or ModelPython.probe())
    if found:
        return found
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), _system_backends(Path(on_path)), None, (), "PATH")
    return None


def _system_backends(binary: Path) -> Path:
    for candidate in (binary.resolve().parent.parent / "backends", Path("/opt/tritonserver/backends")):
        if (candidate / "python").is_dir():
            return candidate
    raise ServerError(f"{binary}: no backends/python folder next to it or in /opt/tritonserver "
                      "(the repository's models need the Python backend)")


def docker_command(repository: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   jetson: bool = False, source: Path | None = None) -> list[str]:
    """The `docker run` line serving the repository in NVIDIA's container: the container's Python
    backend needs eclipse-export's runtime installed into it (from this source tree, mounted)."""
    source = source or Path(eclipse_export.__file__).resolve().parent.parent
    extra = "gpu" if not jetson else "trt-cu12"
    # the bundle sits inside the repository (hard links or a copy); a symlinked one would point
    # outside the mount
    inner = (f"pip install --quiet '/opt/eclipse-export[{extra}]' && "
             "exec tritonserver --model-repository=/models")
    return ["docker", "run", "--rm", "--gpus=all" if not jetson else "--runtime=nvidia", "--shm-size=1g",
            f"-p{http_port}:8000", f"-p{grpc_port}:8001", f"-p{metrics_port}:8002",
            "-v", f"{Path(repository).resolve()}:/models:ro", "-v", f"{source}:/opt/eclipse-export:ro",
            JETSON_CONTAINER if jetson else CONTAINER, "bash", "-c", inner]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_environment(install: TritonInstall, python: ModelPython, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [str(p) for p in ((python.libdir,) if python.libdir else ()) + install.libs]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub's embedded interpreter ignores PYTHONPATH; it finds its prefix (and so a venv's
    # pyvenv.cfg and site-packages) from the first `python3` on PATH: this interpreter's.
    # (not resolved: a venv's bin/python3 is a symlink to the base interpreter)
    env["PATH"] = os.pathsep.join([str(python.executable.parent)] + ([env["PATH"]] if env.get("PATH") else []))
    return env


def package_root() -> Path:
    """The folder holding the running eclipse_export: the server runs there, and the stub puts
    its working directory first on sys.path, so the models import this very package (an editable
    install or a source checkout included), not another copy on the path."""
    return Path(eclipse_export.__file__).resolve().parent.parent


def _child_signals() -> None:
    # runs in the child between fork and exec (only signal calls: safe there even if the
    # launcher has threads)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


class TritonServer:
    """One tritonserver process on a repository: `with TritonServer(repo) as s: ...` starts it,
    waits until it is ready and stops it (SIGINT, then waits) on the way out."""

    def __init__(self, repository: str | Path, install: TritonInstall | None = None, host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None, metrics_port: int | None = None,
                 log=None, extra_args: tuple[str, ...] = (), exit_timeout_s: int = 30,
                 python: str | Path | None = None):
        self.repository = Path(repository).resolve()
        if not (self.repository / "eclipse" / "config.pbtxt").is_file():
            raise ServerError(f"{repository} is not a model repository written by eclipse-export --target triton "
                              "(no eclipse/config.pbtxt)")
        self.python = ModelPython.probe(python)
        self.install = install or find_tritonserver(python=self.python)
        if self.install is None:
            raise ServerError(f"no tritonserver found for {self.python.executable}: pip install 'eclipse-export[serve]' "
                              "(the server in the nvidia-pytriton wheel), pass --tritonserver, or run NVIDIA's "
                              "container (eclipse-serve --docker prints the line)")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log = log if log is not None else subprocess.DEVNULL  # a file for the server's log
        self.extra_args = tuple(extra_args)
        self.exit_timeout_s = exit_timeout_s
        # the Python backend's shared-memory regions get this prefix: stop() checks none is left
        self.shm_prefix = f"eclipse-serve-{uuid.uuid4().hex[:12]}-"
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.removed_shm: list[str] = []  # regions stop() had to remove (none after a clean stop)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _backend_dir(self) -> Path:
        if self.install.stub is None:
            return self.install.backends
        self.workspace = Path(tempfile.mkdtemp(prefix="eclipse-serve-"))
        python = self.workspace / "backends" / "python"
        python.mkdir(parents=True)
        for item in self.install.backends.joinpath("python").iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        shutil.copy2(self.install.stub, python / "triton_python_backend_stub")
        return self.workspace / "backends"

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self._backend_dir()}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=true",
                "--exit-on-error=true", f"--exit-timeout-secs={self.exit_timeout_s}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args]

    def start(self, ready_timeout_s: float = 300.0) -> "TritonServer":
        cmd = self.command()
        self.process = subprocess.Popen(cmd, env=server_environment(self.install, self.python), stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_child_signals, start_new_session=True, cwd=package_root())
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} before it was ready "
                                  "(its log says why)")
            if self.ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s")

    def leftover_shm(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT (Triton's clean shutdown), wait; SIGKILL only if it does not end in time.
        Returns the exit status (None if it was never started)."""
        timeout_s = timeout_s if timeout_s is not None else self.exit_timeout_s + 15
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            status = self.process.returncode
            # a clean stop leaves none; one cut short (clients holding connections past the exit
            # timeout, a kill) leaves the Python backend's regions: remove ours, say so
            self.removed_shm = self.leftover_shm()
            for name in self.removed_shm:
                (SHM_DIR / name).unlink(missing_ok=True)
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None
        return status

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
