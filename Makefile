# The two commands a user needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# make demo TEACHER=options/teacher/resshift_realsr_x4.yml: distill the official ResShift instead
TEACHER ?= options/demo/resshift_demo_x4.yml

demo: $(STAMP)
	$(PY) scripts/run_demo.py --teacher $(TEACHER)

clean:
	rm -rf experiments tb_logger results datasets/demo options_demo
