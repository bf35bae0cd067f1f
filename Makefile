# Two entry points: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pytest workers (pytest-xdist). On the 2-core CI machine two workers ran the 870 tests in 7 min 31 s (1.8 cores
# busy on average: 13 min 49 s of CPU time), one process in 12 min 13 s (one run after the other).
# Whole test files go to one worker (--dist loadfile) so module fixtures that train a run are built once; the
# 15 slowest tests are listed at the end.
TEST_WORKERS ?= 2

.PHONY: demo test bench lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	# --no-compile: bytecode is written on first import instead, for the modules used (27 s vs 59 s to install).
	$(PY) -m pip install -q --no-compile -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moescale.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: $(STAMP)  # layer step times into BENCHMARKS.md
	$(PY) benchmarks/layer_step.py --repeats 50 --write BENCHMARKS.md

# Regenerate exact pins after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^moescale' > requirements.lock
