# `make run` and `make test` are all a fresh clone needs: the venv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: venv run test test-all fuzz bench clean prism flink-up flink-down constraints

venv: $(INSTALLED)

# The tested versions of everything (constraints.txt); `make constraints` records new ones.
$(INSTALLED): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[cpu,report,test]'
	touch $(INSTALLED)

constraints: $(INSTALLED)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } \
	    > constraints.txt.new && mv constraints.txt.new constraints.txt

# The built-in demo: generated model and data, three runs in a row on the DirectRunner.
run: $(INSTALLED)
	$(BIN)/seqcarry demo

# The default suite (tests marked `slow` are left out; `make test-all` runs them too).
test: $(INSTALLED)
	$(BIN)/python -m pytest

test-all: $(INSTALLED)
	$(BIN)/python -m pytest -m ''

# The input fuzz test at a larger size, with a new seed each time (printed, to replay it
# with FUZZ_SEED=...). FUZZ_FILES=N for another size.
FUZZ_FILES ?= 10000
fuzz: $(INSTALLED)
	seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); echo "FUZZ_SEED=$$seed"; \
	FUZZ_SEED=$$seed FUZZ_FILES=$(FUZZ_FILES) $(BIN)/python -m pytest -p no:cacheprovider \
	    -n 0 -o addopts='' tests/test_fuzz.py

# Steps/s of the pipeline vs plain Keras vs one-sequence-at-a-time vs the kernel alone.
# BENCH_ARGS=--scale=0.25 for a quick run.
bench: $(INSTALLED)
	$(BIN)/python -m bench.bench $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache

# Real engines on 127.0.0.1 (docs/runners.md, "Engines on this machine"). Each prints as its
# last line the flags to add to `seqcarry run`.
prism: $(INSTALLED)
	engines/prism.sh

flink-up: $(INSTALLED)
	$(BIN)/python engines/flink.py up

flink-down:
	$(BIN)/python engines/flink.py down
