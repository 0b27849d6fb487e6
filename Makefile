# Two commands on a fresh machine (see README):  make demo   and   make test
# Both install into .venv first (once; again when pyproject.toml changes).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= a red cube on a blue sphere

.PHONY: demo test install clean cc-present cpp cpp-asan cpp-ort cpp-deps

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
	cmake -S cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build $(CPP_BUILD) -j $(JOBS)

# the same under AddressSanitizer + UndefinedBehaviorSanitizer
cpp-asan: cpp-deps
	cmake -S cpp -B $(CPP_ASAN) -DCMAKE_BUILD_TYPE=Debug -DECLIPSE_SANITIZE=ON > /dev/null
	cmake --build $(CPP_ASAN) -j $(JOBS)

# with the ONNX Runtime backend (needs ORT_INCLUDE; see README "Embedding in C/C++")
cpp-ort: cpp-deps $(STAMP)
	cmake -S cpp -B $(CPP_ORT) -DCMAKE_BUILD_TYPE=Release -DECLIPSE_WITH_ONNXRUNTIME=ON \
	  -DECLIPSE_ORT_INCLUDE_DIR=$(abspath $(ORT_INCLUDE)) -DECLIPSE_ORT_LIBRARY=$(abspath $(ORT_LIBRARY)) > /dev/null
	cmake --build $(CPP_ORT) -j $(JOBS)

# C++ tests (plain and sanitized), then the Python suite (which checks the C++ chain against the
# Python runtime through build/cpp, and again through build/cpp-asan)
test: $(STAMP) cc-present cpp cpp-asan
	ctest --test-dir $(CPP_BUILD) --output-on-failure
	ctest --test-dir $(CPP_ASAN) --output-on-failure
	$(BIN)/python -m pytest -q

clean:
	rm -rf engines/tiny-onnx out.png
