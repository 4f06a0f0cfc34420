# ckpt_ext: `make demo` (main job) and `make test` (all CPU lanes) install what they need into .venv.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.deps-stamp

.PHONY: install demo test test-fast test-slow test-hf5 bench lint check-cuda clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch: keep an installed one, else the local CPU wheel (a plain `torch` would pull a 5.5 GB CUDA build).
$(STAMP): $(VPY) requirements-test.txt
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements-test.txt
	touch $(STAMP)

# Rebuild ckpt_ext._C only when the build inputs change (editable install: Python edits need no reinstall).
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
INSTALLED    := $(VENV)/.install-stamp

$(INSTALLED): $(STAMP) $(BUILD_INPUTS)
	$(PIP) install -q --no-build-isolation -e .
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(VPY) -m bench.demo

test: install
	$(VPY) -m pytest -q -m "not slow" -p no:cacheprovider

# The slow lane (long property-based runs); no test collected (pytest exit code 5) fails it like any error.
test-slow: install
	$(VPY) -m pytest -q -m slow -p no:cacheprovider

# transformers 5 lane: the Hugging Face suites in a separate venv with the newest transformers 5.x and the `kernels`
# distribution it imports (which the top-level kernels/ folder must not shadow when run from the repo root).
VENV5 ?= .venv-tf5
TF5   ?= transformers>=5,<6
HF_TESTS := tests/test_hf.py tests/test_hf_llama.py tests/test_hf_regressions.py tests/test_hf_lora.py tests/test_attention_segments.py \
            tests/test_hf_encoders.py tests/test_hf_modernbert.py

$(VENV5)/.deps-stamp:
	$(PY) -m venv $(VENV5)
	$(VENV5)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV5)/bin/python -c "import torch" 2>/dev/null || $(VENV5)/bin/python -m pip install -q $(TORCH)
	$(VENV5)/bin/python -m pip install -q "$(TF5)" kernels peft pytest hypothesis numpy triton==3.9.0 ninja
	touch $@

test-hf5: $(VENV5)/.deps-stamp
	$(VENV5)/bin/python -m pip install -q --no-build-isolation -e .
	$(VENV5)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV5)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(HF_TESTS)

bench: install
	$(VPY) -m bench.microbench

lint: install
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

check-cuda:
	bash csrc/check_cuda.sh

clean:
	rm -rf build *.egg-info ckpt_ext/*.so
