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
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

# The built-in default: generate the shapes data set, train the smallest student and a teacher, evaluate, table.
demo: setup
	$(BIN)/curriculum train configs/student.yaml configs/teacher_resnet_mini.yaml --resume --table runs/demo/table.md

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
