# Fresh machine: `make demo` or `make test`. Both create .venv when missing and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mm_lens.cli demo

test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || echo "chromium not installed: the report rendering test will say so"
	$(PY) -m pytest -q -ra --durations=15

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_path_patching.py

clean:
	rm -rf $(VENV) mm_lens_report .pytest_cache
