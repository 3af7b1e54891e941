# Two entry points (see README): `make demo` runs the main job on the built-in default, `make test` the tests.
# Both create the virtual environment .venv first (Python 3.11, pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .[export]
	touch $@

# The built-in default: the progressive curriculum over the built-in teachers on the built-in data set (data set,
# teachers, cache, stages on Ray Train, baseline, report in runs/curriculum/report). --resume: a second `make demo`
# reuses what the first one finished.
demo: setup
	$(BIN)/curriculum run configs/run_default.yaml --resume

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
