# Fresh machine: `make demo` or `make test`. Both create .venv when missing and install into it the
# versions the suite was last run with (constraints.txt); pyproject.toml keeps the honest ranges.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TL4 := $(VENV)/tl4

.PHONY: demo test lint test-tl4 test-latest install wheel bench bench-load clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mm_lens.cli demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1; then \
	  echo "make test: installing Debian's chromium (outside .venv, with apt-get) for the headless-browser tests"; \
	  (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "make test: chromium could not be installed: the headless-browser tests will fail and say so"; \
	fi
	$(PY) -m pytest -q -ra --durations=15

# transformer-lens 4.x (the suite runs on 3.x, which SAE-Lens needs): the TransformerLens-facing tests
# again with 4.x shadowing 3.x (4.x needs nothing 3.x does not).
test-tl4: $(STAMP)
	@test -d $(TL4) || $(PY) -m pip install -q --no-deps -c constraints-tl4.txt --target $(TL4) transformer-lens
	PYTHONPATH=$(TL4) $(PY) -m pytest -q -ra -m "not slow" tests/unit/test_tl_compat.py tests/methods/test_patching.py \
	  tests/methods/test_path_patching.py tests/methods/test_ambient_hooks.py tests/unit/test_model.py \
	  tests/unit/test_generate.py tests/unit/test_tl_signatures.py tests/unit/test_nnsight.py \
	  tests/parity/test_qwen3_vl_parity.py
	@PYTHONPATH=$(TL4) $(PY) -c "import transformer_lens, importlib.metadata as m; print('ran with transformer-lens', m.version('transformer-lens'))"

# Not in CI: the newest release of every dependency, to see what the next constraints.txt would break.
test-latest:
	@test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -m pytest -q -ra

# A wheel to upload to Colab (the notebooks' MM_LENS_SOURCE can point at it).
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .
	@ls dist/*.whl

bench: $(STAMP)
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_path_patching.py
	$(PY) benchmarks/bench_generate.py

# Writes a 7B-shaped random checkpoint (~14 GB) to a temporary folder: needs ~16 GiB of RAM and ~15 GB of disk.
bench-load: $(STAMP)
	$(PY) benchmarks/bench_load.py

clean:
	rm -rf $(VENV) .venv-latest mm_lens_report .pytest_cache
