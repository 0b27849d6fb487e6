# Two commands on a fresh machine (see README):  make demo   and   make test
# Both install into .venv first (once; again when pyproject.toml changes).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= a red cube on a blue sphere

.PHONY: demo test test-serve install clean cc-present cpp cpp-asan cpp-ort cpp-trt cpp-trt-rtx cpp-deps

# C/C++ runtime (cpp/): the Debian/Ubuntu packages it builds with (JetPack ships the same);
# installed with apt when missing, saying so.
CPP_APT := cmake g++ pkg-config nlohmann-json3-dev libutf8proc-dev libpng-dev libssl-dev
CPP_BUILD := build/cpp
CPP_ASAN := build/cpp-asan
CPP_ORT := build/cpp-ort
JOBS ?= 2
# ONNX Runtime backend: headers from an ONNX Runtime release or source tree (no registry ships
# them), the library from the onnxruntime wheel in .venv
ORT_INCLUDE ?= cpp/third_party/onnxruntime/include
ORT_LIBRARY ?= $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*))

# TensorRT backend: headers of the flavour (no registry ships them; README "Embedding in C/C++"
# says where they come from), CUDA's cuda.h and nvrtc.h from the NVIDIA wheels the test extra
# installs into .venv (nvidia-cuda-runtime, nvidia-cuda-nvrtc: CUDA 13; the -cu12 ones: CUDA 12).
CPP_TRT := build/cpp-trt
CPP_TRT_RTX := build/cpp-trt-rtx
TRT_INCLUDE ?= cpp/third_party/tensorrt-11.1/include
RTX_INCLUDE ?= cpp/third_party/tensorrt-rtx-1.6/include
# recursive (=): evaluated when a recipe runs, after .venv exists
NVIDIA_WHEELS = $(abspath $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/nvidia)))
CUDA_INCLUDE ?= $(NVIDIA_WHEELS)/cu13/include
# TensorRT's headers include cuda_runtime_api.h, which needs the toolkit's crt/ headers (not in
# those wheels): a CUDA toolkit's include/ (JetPack and x86 installs have /usr/local/cuda)
CUDA_HOME ?= /usr/local/cuda
CUDA12_INCLUDE = $(NVIDIA_WHEELS)/cuda_runtime/include;$(NVIDIA_WHEELS)/cuda_nvrtc/include
RTX_LIBS = $(abspath $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/tensorrt_rtx_libs)))
# CI (no TensorRT headers): the backend's CUDA parts (driver calls, NVRTC compile of the embedded
# kernel) build into eclipse-cuda-check against the wheels' CUDA 13 and CUDA 12 headers
CUDA_CHECK_FLAGS = $(if $(wildcard $(NVIDIA_WHEELS)/cu13/include/cuda.h),-DECLIPSE_BUILD_CUDA_CHECKS=ON \
	-DECLIPSE_CUDA_INCLUDE_DIR=$(CUDA_INCLUDE) "-DECLIPSE_CUDA12_INCLUDE_DIR=$(CUDA12_INCLUDE)",-DECLIPSE_BUILD_CUDA_CHECKS=OFF)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: its CPU wheel, so that nothing below resolves a CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[export,test]"
	# only for the CLIP BPE merges file; --no-deps keeps torchvision out (it breaks CPU torch)
	$(BIN)/pip install --no-deps open_clip_torch
	touch $(STAMP)

install: $(STAMP)

# Serving environment (README "Serving"): the tritonserver inside the nvidia-pytriton wheel runs its
# Python-backend models with this interpreter's environment, and that Triton (2.51) needs numpy < 2,
# which the shared .venv (numpy 2) cannot have; Ray Serve lives here too. No torch.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
$(SERVE_STAMP): pyproject.toml
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --upgrade pip
	$(SERVE_VENV)/bin/pip install -e ".[serve,ray]"
	touch $(SERVE_STAMP)

# the serving tests alone: a real tritonserver and a local Ray cluster on 127.0.0.1 (a few minutes)
test-serve: $(STAMP) $(SERVE_STAMP)
	ECLIPSE_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_serve.py tests/test_serve_ray.py tests/test_serve_limits.py

demo: $(STAMP)
	$(BIN)/eclipse-export --preset tiny --target onnx --out engines/tiny-onnx --overwrite
	$(BIN)/eclipse-generate --bundle engines/tiny-onnx --prompt "$(PROMPT)" --seed 0 --out out.png --compare-reference

# tests/test_cuda_api.py builds a stand-in NVIDIA driver library with the system C compiler
cc-present:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { \
		echo "installing gcc (tests/test_cuda_api.py compiles a stand-in driver library)"; \
		apt-get update -qq && apt-get install -y -qq gcc; }

cpp-deps:
	@if ! command -v dpkg-query > /dev/null; then \
	  echo "not a Debian/Ubuntu system: make sure these (or your system's equivalents) are installed: $(CPP_APT)"; \
	else \
	  missing=$$(for p in $(CPP_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing missing apt packages for the C/C++ runtime:" $$missing; \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing > /dev/null; \
	  fi; \
	fi

# core + custom backend + example + C++ tests (what CI builds)
cpp: cpp-deps
	cmake -S cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release $(CUDA_CHECK_FLAGS) > /dev/null
	cmake --build $(CPP_BUILD) -j $(JOBS)

# the same under AddressSanitizer + UndefinedBehaviorSanitizer
cpp-asan: cpp-deps
	cmake -S cpp -B $(CPP_ASAN) -DCMAKE_BUILD_TYPE=Debug -DECLIPSE_SANITIZE=ON > /dev/null
	cmake --build $(CPP_ASAN) -j $(JOBS)

# with the ONNX Runtime backend (needs ORT_INCLUDE; see README "Embedding in C/C++"): core, backend,
# example (opening the wheel's libonnxruntime by default) and tests in build/cpp-ort
cpp-ort: cpp-deps $(STAMP)
	@test -f $(ORT_INCLUDE)/onnxruntime_c_api.h || { \
	  v=$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)'); \
	  echo "error: no onnxruntime_c_api.h in $(ORT_INCLUDE): put there the include/ of ONNX Runtime $$v's release" \
	       "(onnxruntime-linux-$$(uname -m | sed s/x86_64/x64/)-$$v.tgz; README: Embedding in C/C++) or pass ORT_INCLUDE=DIR" >&2; \
	  exit 2; }
	cmake -S cpp -B $(CPP_ORT) -DCMAKE_BUILD_TYPE=Release -DECLIPSE_WITH_ONNXRUNTIME=ON \
	  -DECLIPSE_ORT_INCLUDE_DIR=$(abspath $(ORT_INCLUDE)) -DECLIPSE_ORT_LIBRARY=$(abspath $(ORT_LIBRARY)) > /dev/null
	cmake --build $(CPP_ORT) -j $(JOBS)

# with the TensorRT backend, against TensorRT 10.3+/11.x headers (TRT_INCLUDE; -Werror). Runs only
# where TensorRT and a GPU are; here it proves the backend compiles.
cpp-trt: cpp-deps $(STAMP)
	cmake -S cpp -B $(CPP_TRT) -DCMAKE_BUILD_TYPE=Release -DECLIPSE_WERROR=ON -DECLIPSE_WITH_TENSORRT=ON \
	  -DECLIPSE_TENSORRT_INCLUDE_DIR=$(abspath $(TRT_INCLUDE)) -DECLIPSE_CUDA_INCLUDE_DIR=$(CUDA_HOME)/include \
	  -DECLIPSE_NVRTC_INCLUDE_DIR=$(CUDA_INCLUDE) -DECLIPSE_BUILD_CUDA_CHECKS=ON > /dev/null
	cmake --build $(CPP_TRT) -j $(JOBS)

# with the TensorRT-RTX backend (RTX_INCLUDE), opening the tensorrt-rtx wheel's library by default
cpp-trt-rtx: cpp-deps $(STAMP)
	cmake -S cpp -B $(CPP_TRT_RTX) -DCMAKE_BUILD_TYPE=Release -DECLIPSE_WERROR=ON -DECLIPSE_WITH_TENSORRT=ON \
	  -DECLIPSE_TENSORRT_RTX=ON -DECLIPSE_TENSORRT_INCLUDE_DIR=$(abspath $(RTX_INCLUDE)) \
	  -DECLIPSE_CUDA_INCLUDE_DIR=$(CUDA_HOME)/include -DECLIPSE_NVRTC_INCLUDE_DIR=$(CUDA_INCLUDE) \
	  -DECLIPSE_TENSORRT_LIBRARY=$(RTX_LIBS)/libtensorrt_rtx.so.1 \
	  -DECLIPSE_TENSORRT_ONNXPARSER_LIBRARY=$(RTX_LIBS)/libtensorrt_onnxparser_rtx.so.1 \
	  -DECLIPSE_NVRTC_LIBRARY=$(NVIDIA_WHEELS)/cu13/lib/libnvrtc.so.13 -DECLIPSE_BUILD_CUDA_CHECKS=ON > /dev/null
	cmake --build $(CPP_TRT_RTX) -j $(JOBS)

# C++ tests (plain and sanitized), then the Python suite (which checks the C++ chain against the
# Python runtime through build/cpp, and again through build/cpp-asan)
test: $(STAMP) $(SERVE_STAMP) cc-present cpp cpp-asan
	ctest --test-dir $(CPP_BUILD) --output-on-failure
	ctest --test-dir $(CPP_ASAN) --output-on-failure
	# the package's layers (pyproject.toml [tool.importlinter], docs/architecture.md)
	$(BIN)/lint-imports
	ECLIPSE_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf engines/tiny-onnx out.png
