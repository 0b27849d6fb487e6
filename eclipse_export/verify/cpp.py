"""The C/C++ runtime (libeclipse, cpp/) from Python through ctypes: a view of
cpp/include/eclipse/eclipse.h, a custom backend serving the bundle's graphs from ONNX Runtime's
Python package (how CI runs the C++ chain without ONNX Runtime's C headers, which no registry
ships), and a side-by-side measurement of the two runtimes:

    python -m eclipse_export.verify.cpp --bundle engines/tiny-onnx --lib build/cpp-ort/libeclipse.so

No torch: this module only needs numpy, onnxruntime and the built library.
"""

from __future__ import annotations

import ctypes as C
import os
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB = ROOT / "build" / "cpp" / "libeclipse.so"

OK, ERR_INVALID_ARGUMENT, ERR_BUNDLE, ERR_BACKEND, ERR_UNSUPPORTED, ERR_CANCELLED, ERR_IO = range(7)
SCHEDULERS = {None: 0, "ddpm": 1, "ddim": 2}
MAX_RANK = 8


class Tensor(C.Structure):
    _fields_ = [("name", C.c_char_p), ("dtype", C.c_int), ("rank", C.c_int32),
                ("shape", C.c_int64 * MAX_RANK), ("data", C.c_void_p)]


class StepCoefficients(C.Structure):
    _fields_ = [(n, C.c_float) for n in ("a", "b", "clip", "c_x0", "c_x", "c_eps", "std")]


PROGRESS = C.CFUNCTYPE(C.c_int, C.c_int32, C.c_int32, C.c_void_p)


class DenoiseCall(C.Structure):
    _fields_ = [("latents", C.POINTER(C.c_float)), ("latent_shape", C.c_int64 * 4),
                ("image_embeds", C.POINTER(C.c_float)), ("embeds_shape", C.c_int64 * 2),
                ("steps", C.c_int32), ("timesteps", C.POINTER(C.c_float)),
                ("coefficients", C.POINTER(StepCoefficients)), ("cfg", C.c_int32), ("guidance_scale", C.c_float),
                ("step_noise", C.POINTER(C.c_float)), ("out_latents", C.POINTER(C.c_float)),
                ("progress", PROGRESS), ("progress_data", C.c_void_p)]


LOAD = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_char_p, C.c_char_p, C.POINTER(C.c_void_p))
RUN = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.POINTER(Tensor), C.c_size_t, C.POINTER(Tensor), C.c_size_t)
FREE_SESSION = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p)
FREE_USER = C.CFUNCTYPE(None, C.c_void_p)
DENOISE = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.POINTER(DenoiseCall))


class CustomBackend(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("user_data", C.c_void_p), ("name", C.c_char_p), ("load", LOAD),
                ("run", RUN), ("free_session", FREE_SESSION), ("free_user_data", FREE_USER), ("denoise", DENOISE)]


class OrtOptions(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("providers", C.c_char_p), ("intra_op_threads", C.c_int32),
                ("device_id", C.c_int32), ("library_path", C.c_char_p)]


class Image(C.Structure):
    _fields_ = [("path", C.c_char_p), ("pixels", C.POINTER(C.c_uint8)), ("width", C.c_int32), ("height", C.c_int32),
                ("channels", C.c_int32), ("stride", C.c_size_t)]


class Subject(C.Structure):
    _fields_ = [("image", Image), ("keyword", C.c_char_p)]


class Noise(C.Structure):
    _fields_ = [("name", C.c_char_p), ("data", C.POINTER(C.c_float)), ("count", C.c_size_t)]


class Params(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("api_version", C.c_uint32), ("negative_prompt", C.c_char_p),
                ("width", C.c_int32), ("height", C.c_int32), ("steps", C.c_int32), ("guidance_scale", C.c_double),
                ("seed", C.c_uint64), ("scheduler", C.c_int), ("progress", PROGRESS), ("progress_data", C.c_void_p),
                ("prior_noise", C.POINTER(C.c_float)), ("prior_noise_count", C.c_size_t),
                ("latent_noise", C.POINTER(C.c_float)), ("latent_noise_count", C.c_size_t),
                ("step_noise", C.POINTER(C.c_float)), ("step_noise_count", C.c_size_t),
                # API 2
                ("subjects", C.POINTER(Subject)), ("subject_count", C.c_size_t),
                ("control_image", C.POINTER(Image)), ("noises", C.POINTER(Noise)), ("noise_count", C.c_size_t)]


def image_arg(image, keep: list) -> Image:
    """A path (str/Path) or an (H,W), (H,W,3) or (H,W,4) uint8 array (any row stride) as an eclipse_image."""
    if isinstance(image, (str, os.PathLike)):
        return Image(os.fsencode(image), None, 0, 0, 0, 0)
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.strides[1] != a.shape[2] or a.strides[2] != 1:
        a = np.ascontiguousarray(a, np.uint8)
    keep.append(a)
    return Image(None, a.ctypes.data_as(C.POINTER(C.c_uint8)), a.shape[1], a.shape[0], a.shape[2], a.strides[0])


def load_library(path: str | os.PathLike | None = None) -> C.CDLL:
    path = Path(path or os.environ.get("ECLIPSE_LIB") or DEFAULT_LIB)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not built: run `make cpp` (make test builds it)")
    lib = C.CDLL(str(path))
    p, i32, u64, sz = C.c_void_p, C.c_int32, C.c_uint64, C.c_size_t
    sigs = {
        "eclipse_last_error": (C.c_char_p, []),
        "eclipse_version": (C.c_char_p, []),
        "eclipse_set_log_callback": (None, [p, p]),
        "eclipse_backend_available": (C.c_int, [C.c_char_p]),
        "eclipse_backend_custom_create": (C.c_int, [C.POINTER(CustomBackend), C.POINTER(p)]),
        "eclipse_backend_onnxruntime_create": (C.c_int, [C.POINTER(OrtOptions), C.POINTER(p)]),
        "eclipse_backend_free": (None, [p]),
        "eclipse_bundle_open": (C.c_int, [C.c_char_p, C.c_int, C.POINTER(p)]),
        "eclipse_bundle_free": (None, [p]),
        "eclipse_bundle_dim": (C.c_int64, [p, C.c_char_p]),
        "eclipse_tokenize": (C.c_int, [p, C.c_char_p, C.POINTER(i32), C.POINTER(i32), i32, C.POINTER(i32)]),
        "eclipse_schedule": (C.c_int, [p, C.c_int, i32, C.POINTER(C.c_int64), C.POINTER(StepCoefficients)]),
        "eclipse_normals": (None, [u64, C.c_uint32, C.POINTER(C.c_float), sz]),
        "eclipse_context_create": (C.c_int, [p, p, C.POINTER(p)]),
        "eclipse_context_free": (None, [p]),
        "eclipse_state_create": (C.c_int, [p, C.POINTER(p)]),
        "eclipse_state_free": (None, [p]),
        "eclipse_default_params": (Params, []),
        "eclipse_bundle_default_params": (Params, [p]),
        "eclipse_generate": (C.c_int, [p, C.c_char_p, C.POINTER(Params), C.POINTER(p)]),
        "eclipse_result_width": (i32, [p]),
        "eclipse_result_height": (i32, [p]),
        "eclipse_result_pixels": (C.POINTER(C.c_uint8), [p]),
        "eclipse_result_timing": (C.c_double, [p, C.c_char_p]),
        "eclipse_result_warning_count": (sz, [p]),
        "eclipse_result_warning": (C.c_char_p, [p, sz]),
        "eclipse_result_save_png": (C.c_int, [p, C.c_char_p]),
        "eclipse_result_free": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib.eclipse_set_log_callback(None, None)  # warnings are read from results in tests
    return lib


class EclipseError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


def check(lib, status: int) -> None:
    if status != OK:
        raise EclipseError(status, lib.eclipse_last_error().decode())


def _f32(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_float))


class OrtGraphs:
    """The custom backend's function table, backed by onnxruntime.InferenceSession. Keeps its
    ctypes callbacks alive as long as it lives; optionally runs the UNet loop itself (`denoise`)
    the way a device backend would: from the library's per-step coefficients."""

    def __init__(self, device_loop: bool = False, reuse_sessions: bool = False):
        import onnxruntime as ort

        self._reuse = {} if reuse_sessions else None  # graph path -> InferenceSession (fuzzing reloads often)
        self._ort = ort
        self.sessions: dict[int, tuple[str, object]] = {}
        self.loaded: list[str] = []
        self.runs = 0
        self.denoise_calls = 0
        self._lock = threading.Lock()
        self._next = 1
        self.error: BaseException | None = None
        self._callbacks = (LOAD(self._load), RUN(self._run), FREE_SESSION(self._free),
                           DENOISE(self._denoise) if device_loop else DENOISE())
        self.table = CustomBackend(C.sizeof(CustomBackend), None, b"ort-python", self._callbacks[0], self._callbacks[1],
                                   self._callbacks[2], FREE_USER(), self._callbacks[3])

    def _load(self, _user, component, graph_path, out):
        try:
            path = graph_path.decode()
            session = self._reuse.get(path) if self._reuse is not None else None
            if session is None:
                opts = self._ort.SessionOptions()
                opts.log_severity_level = 3
                session = self._ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                if self._reuse is not None:
                    self._reuse[path] = session
            with self._lock:
                handle, self._next = self._next, self._next + 1
                self.sessions[handle] = (component.decode(), session)
                self.loaded.append(component.decode())
            out[0] = handle
            return 0
        except BaseException as e:  # noqa: BLE001 - reported through the status, never across C
            self.error = e
            return 1

    @staticmethod
    def _array(t: Tensor) -> np.ndarray:
        shape = tuple(t.shape[: t.rank])
        ctype = C.c_float if t.dtype == 1 else C.c_int32
        count = int(np.prod(shape))
        return np.ctypeslib.as_array(C.cast(t.data, C.POINTER(ctype)), shape=(count,)).reshape(shape)

    def _run(self, _user, handle, inputs, n_in, outputs, n_out):
        try:
            _, session = self.sessions[handle]
            feed = {inputs[i].name.decode(): self._array(inputs[i]).copy() for i in range(n_in)}
            names = [outputs[i].name.decode() for i in range(n_out)]
            results = session.run(names, feed)
            for i, value in enumerate(results):
                dst = self._array(outputs[i])
                if dst.shape != value.shape:
                    raise ValueError(f"{names[i]}: graph gave {value.shape}, the library expects {dst.shape}")
                dst[...] = value
            with self._lock:
                self.runs += 1
            return 0
        except BaseException as e:  # noqa: BLE001
            self.error = e
            return 1

    def _free(self, _user, handle):
        with self._lock:
            self.sessions.pop(handle, None)

    def _denoise(self, _user, handle, call_ptr):
        """The device-loop contract in numpy: CFG + schedulers.apply_step per coefficients."""
        from eclipse_export.runtime.guidance import cfg_batch, combine
        from eclipse_export.runtime.schedulers import StepCoefficients as PyCoefficients
        from eclipse_export.runtime.schedulers import apply_step

        try:
            call = call_ptr.contents
            _, session = self.sessions[handle]
            shape = tuple(call.latent_shape)
            n = int(np.prod(shape))
            latents = np.ctypeslib.as_array(call.latents, shape=(n,)).reshape(shape).copy()
            embeds = np.ctypeslib.as_array(call.image_embeds, shape=(int(np.prod(tuple(call.embeds_shape))),))
            embeds = embeds.reshape(tuple(call.embeds_shape)).copy()
            noise = (np.ctypeslib.as_array(call.step_noise, shape=(call.steps * n,)).reshape((call.steps, *shape))
                     if call.step_noise else None)
            for i in range(call.steps):
                sample = cfg_batch(latents) if call.cfg else latents
                t = np.array([call.timesteps[i]], dtype=np.float32)
                eps = session.run(["noise_pred"], {"sample": sample, "timestep": t, "image_embeds": embeds})[0]
                if call.cfg:
                    eps = combine(eps, call.guidance_scale)
                k = call.coefficients[i]
                coeffs = PyCoefficients(k.a, k.b, k.clip, k.c_x0, k.c_x, k.c_eps, k.std)
                latents = apply_step(coeffs, eps, latents, noise[i] if noise is not None and k.std != 0 else None)
                if call.progress(i + 1, call.steps, call.progress_data) != 0:
                    return 1
            np.ctypeslib.as_array(call.out_latents, shape=(n,))[:] = latents.reshape(-1)
            with self._lock:
                self.denoise_calls += 1
            return 0
        except BaseException as e:  # noqa: BLE001
            self.error = e
            return 1


class Runtime:
    """bundle + backend + context of the C library, freed together."""

    def __init__(self, lib, bundle: Path, backend_table=None, verify_hashes: bool = True, ort_backend: bool = False,
                 threads: int = 0):
        self.lib = lib
        self.bundle = C.c_void_p()
        check(lib, lib.eclipse_bundle_open(str(bundle).encode(), int(verify_hashes), C.byref(self.bundle)))
        self.backend = C.c_void_p()
        if ort_backend:  # the library's own ONNX Runtime backend (C API), CPU provider
            options = OrtOptions(C.sizeof(OrtOptions), b"cpu", threads, 0, None)
            check(lib, lib.eclipse_backend_onnxruntime_create(C.byref(options), C.byref(self.backend)))
        else:
            check(lib, lib.eclipse_backend_custom_create(C.byref(backend_table), C.byref(self.backend)))
        self.context = C.c_void_p()
        check(lib, lib.eclipse_context_create(self.bundle, self.backend, C.byref(self.context)))

    def close(self):
        for fn, h in ((self.lib.eclipse_context_free, self.context), (self.lib.eclipse_backend_free, self.backend),
                      (self.lib.eclipse_bundle_free, self.bundle)):
            fn(h)

    def generate(self, prompt: str, negative_prompt: str | None = None, height: int = 64, width: int = 64,
                 steps: int = 3, guidance_scale: float = 4.0, seed: int = 0, scheduler: str | None = None,
                 progress=None, noises=None, state=None, png: Path | None = None, subjects=(), control_image=None,
                 named_noises: dict | None = None) -> dict:
        """subjects: [(path or uint8 array, keyword)]; named_noises: {name: array} (eclipse_params.noises)."""
        lib = self.lib
        p = lib.eclipse_default_params()
        p.negative_prompt = None if negative_prompt is None else negative_prompt.encode()
        p.height, p.width, p.steps, p.guidance_scale, p.seed = height, width, steps, guidance_scale, seed
        p.scheduler = SCHEDULERS[scheduler]
        keep = []
        if progress is not None:
            cb = PROGRESS(lambda i, n, _d: progress(i, n))
            keep.append(cb)
            p.progress = cb
        if noises is not None:
            arrays = [np.ascontiguousarray(a, np.float32) if a is not None else None
                      for a in (noises.prior, noises.latents, noises.steps)]
            keep += arrays
            for field, a in zip(("prior_noise", "latent_noise", "step_noise"), arrays):
                if a is not None:
                    setattr(p, field, _f32(a))
                    setattr(p, field + "_count", a.size)
        if subjects:
            array = (Subject * len(subjects))(*[Subject(image_arg(image, keep), keyword.encode())
                                                for image, keyword in subjects])
            keep.append(array)
            p.subjects, p.subject_count = array, len(subjects)
        if control_image is not None:
            control = image_arg(control_image, keep)
            keep.append(control)
            p.control_image = C.pointer(control)
        if named_noises:
            arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in named_noises.items()}
            keep.append(arrays)
            table = (Noise * len(arrays))(*[Noise(k.encode(), _f32(a), a.size) for k, a in arrays.items()])
            keep.append(table)
            p.noises, p.noise_count = table, len(arrays)
        own_state = state is None
        if own_state:
            state = C.c_void_p()
            check(lib, lib.eclipse_state_create(self.context, C.byref(state)))
        result = C.c_void_p()
        try:
            check(lib, lib.eclipse_generate(state, prompt.encode(), C.byref(p), C.byref(result)))
            h, w = lib.eclipse_result_height(result), lib.eclipse_result_width(result)
            pixels = np.ctypeslib.as_array(lib.eclipse_result_pixels(result), shape=(h * w * 3,)).reshape(h, w, 3).copy()
            timings = {k: lib.eclipse_result_timing(result, k.encode())
                       for k in ("text_encoder", "image_encoder", "prior", "unet", "unet_per_step", "movq", "total")}
            timings = {k: v for k, v in timings.items() if v >= 0}  # -1: a stage this family does not run
            warnings = [lib.eclipse_result_warning(result, i).decode()
                        for i in range(lib.eclipse_result_warning_count(result))]
            if png is not None:
                check(lib, lib.eclipse_result_save_png(result, str(png).encode()))
            return {"image": pixels, "timings": timings, "warnings": warnings}
        finally:
            if result:
                lib.eclipse_result_free(result)
            if own_state:
                lib.eclipse_state_free(state)


# --- side-by-side measurement -------------------------------------------------------------------

STAGES = ("text_encoder", "prior", "unet", "unet_per_step", "movq", "total")


def compare(bundle: Path, lib_path: Path, example: Path | None, prompt: str, height: int, width: int, steps: int,
            guidance: float, seed: int, runs: int, threads: int, out_dir: Path) -> dict:
    """The same request on the Python runtime and on the C++ runtime, both on ONNX Runtime CPU in
    this process, alternating runs after one warm-up each; then the example program's PNG."""
    import subprocess
    import time

    from PIL import Image

    from eclipse_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from eclipse_export.runtime.pipeline import Pipeline, Request

    lib = load_library(lib_path)
    if not lib.eclipse_backend_available(b"onnxruntime"):
        raise SystemExit(f"{lib_path} was built without ONNX Runtime (make cpp-ort)")
    python = Pipeline.from_bundle(bundle, OnnxRuntimeBackend(["cpu"], threads or None))
    cpp = Runtime(lib, bundle, ort_backend=True, threads=threads)
    req = Request((prompt,), None, height, width, steps, guidance, seed, None)
    times = {"python": {k: [] for k in STAGES}, "cpp": {k: [] for k in STAGES}}
    try:
        for i in range(runs + 1):
            # a pause between the two: each runtime's ONNX Runtime keeps its threads spinning for a
            # while after a run, which would slow the other's first stage
            gen = python.run(req)
            time.sleep(0.5)
            got = cpp.generate(prompt, None, height, width, steps, guidance, seed)
            time.sleep(0.5)
            if i == 0:
                continue  # warm-up
            for k in STAGES:
                times["python"][k].append(gen.timings[k])
                times["cpp"][k].append(got["timings"][k])
    finally:
        cpp.close()
    report = {"request": dict(prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed),
              "runs": runs, "version": lib.eclipse_version().decode(),
              "p50_ms": {side: {k: 1000 * float(np.median(v)) for k, v in t.items()} for side, t in times.items()},
              "image_max_lsb_inprocess": int(np.abs(got["image"].astype(int) - gen.images[0].astype(int)).max())}
    if example is not None:
        png = out_dir / "cpp-example.png"
        args = [str(example), "--bundle", str(bundle), "--prompt", prompt, "--height", str(height), "--width",
                str(width), "--steps", str(steps), "--guidance", str(guidance), "--seed", str(seed), "--out", str(png)]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{example} failed: {done.stderr.strip()}")
        image = np.asarray(Image.open(png).convert("RGB"))
        report["image_max_lsb_example"] = int(np.abs(image.astype(int) - gen.images[0].astype(int)).max())
    return report


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m eclipse_export.verify.cpp",
                                description="Per-stage latency and image difference: C++ runtime vs Python runtime "
                                            "(both ONNX Runtime CPU, one process).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--lib", type=Path, default=ROOT / "build" / "cpp-ort" / "libeclipse.so")
    p.add_argument("--example", type=Path, default=None, help="eclipse-generate-cpp to run on the same request")
    p.add_argument("--prompt", default="a red cube on a blue sphere")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--out", type=Path, default=Path("."), help="where the example's PNG goes")
    a = p.parse_args(argv)
    r = compare(a.bundle, a.lib, a.example, a.prompt, a.height, a.width, a.steps, a.guidance, a.seed, a.runs,
                a.threads, a.out)
    print("| stage | Python runtime p50 ms | C++ runtime p50 ms | C++ / Python |")
    print("| --- | --- | --- | --- |")
    for k in STAGES:
        py, cc = r["p50_ms"]["python"][k], r["p50_ms"]["cpp"][k]
        print(f"| {k} | {py:.2f} | {cc:.2f} | {cc / py:.2f} |")
    print(f"image max difference: in-process {r['image_max_lsb_inprocess']} LSB"
          + (f", example program {r['image_max_lsb_example']} LSB" if "image_max_lsb_example" in r else ""))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
