# The two commands a user needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench

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

# make test-fast: every test except the end-to-end runs marked slow (demo, subprocess training, torchrun)
.PHONY: test-fast
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# make gpu-check: on a machine with a CUDA GPU, the CUDA tests and the benchmarks in one run (results/gpu/)
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# make demo TEACHER=options/teacher/resshift_realsr_x4.yml: distill the official ResShift instead
TEACHER ?= options/demo/resshift_demo_x4.yml

demo: $(STAMP)
	$(PY) scripts/run_demo.py --teacher $(TEACHER)

# make study: the KD losses over seeds on the demo data, with paired tests (docs/study.md), report in
# results/study/; options pass through, e.g. make study STUDY_ARGS="--seeds 0 1 2 3 --iters 400"
STUDY_ARGS ?=
.PHONY: study
study: $(STAMP)
	$(PY) scripts/run_study.py $(STUDY_ARGS)

# make bench DEVICE=cuda: the benchmark scripts of docs/benchmarks.md (random weights), each
# table written to results/bench/<script>.md (printed at the end; a failing script stops the target)
DEVICE ?= auto
bench: $(STAMP)
	@mkdir -p results/bench
	$(PY) scripts/benchmark_student.py --device $(DEVICE) --repeats 15 --train-iters 9 > results/bench/benchmark_student.md
	$(PY) scripts/benchmark_teacher.py --random-weights --device $(DEVICE) --steps 15 1 --repeats 3 > results/bench/benchmark_teacher.md
	$(PY) scripts/benchmark_complexity.py --random-weights --device $(DEVICE) > results/bench/benchmark_complexity.md
	$(PY) scripts/benchmark_train_step.py --iters 15 --warmup 3 --device $(DEVICE) > results/bench/benchmark_train_step.md
	$(PY) scripts/benchmark_engines.py --threads 2 --repeats 11 --warmup 2 > results/bench/benchmark_engines.md
	@cat results/bench/*.md

clean:
	rm -rf experiments tb_logger results datasets/demo options_demo
