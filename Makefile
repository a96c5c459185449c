# The two set-up commands of the README: `make main` and `make test`.
PY ?= python3

.PHONY: install main test lint bench

install:
	bash scripts/install.sh

main: install
	$(PY) -m misa_train

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

bench:
	$(PY) benchmarks/bench_theory.py
