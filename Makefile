# Two commands on a fresh machine (see README):  make demo   and   make test
# Both install into .venv first (once; again when pyproject.toml changes).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= a red cube on a blue sphere

.PHONY: demo test install clean cc-present

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

test: $(STAMP) cc-present
	$(BIN)/python -m pytest -q

clean:
	rm -rf engines/tiny-onnx out.png
