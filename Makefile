# Two entry points: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

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
	$(VENV)/bin/pytest -q

bench: $(STAMP)  # layer step times into BENCHMARKS.md
	$(PY) benchmarks/layer_step.py --repeats 50 --write BENCHMARKS.md

# Regenerate exact pins after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^moescale' > requirements.lock
