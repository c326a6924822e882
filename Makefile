# Two commands on a fresh machine: `make demo` and `make test`. Both build the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip is pinned, never upgraded to whatever is newest; every other package is pinned by constraints.txt.
PIP_VERSION ?= 25.3

.PHONY: demo test test-fast test-all lint lock bench bench-structured clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## Regenerate constraints.txt from the working virtualenv (after a deliberate dependency change).
lock: $(STAMP)
	{ echo "# Every dependency of prunewise[dev], pinned as CI tested them (make lock regenerates it)."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

## Prune the default model (smollm2-135m) to 50% with Wanda + OWL; dense vs pruned perplexity on wiki-test and code.
## Sized for a first run (32 x 512 calibration, 8,192 evaluation tokens per set): the table prints its 95% intervals.
demo: $(STAMP)
	$(VENV)/bin/prunewise prune --model smollm2-135m --score wanda --allocation owl --sparsity 0.5 \
		--calibration wiki --nsamples 32 --eval wiki-test code --eval-tokens 8192 --output out/demo --overwrite

# Headless Chromium checks the HTML report (Debian's package; needs root, as on CI and the dev machines).
# It does not need the virtualenv, so `make test` installs both at once (make -j2 below).
CHROMIUM := .chromium-installed
$(CHROMIUM):
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $(CHROMIUM)

## Lint (ruff) and the architecture's import contracts (import-linter, pyproject.toml), in seconds.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache

## Lint, the unit tests and the integration tests on the real smollm2-135m (and lm-eval agreement), on two workers.
test:
	$(MAKE) -j2 $(STAMP) $(CHROMIUM)
	$(MAKE) lint
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup

## Everything, with the slow real-model tests (gemma3-270m, qwen2.5-coder-0.5b, lm-eval on 3 x 40 items).
test-all:
	$(MAKE) -j2 $(STAMP) $(CHROMIUM)
	$(MAKE) lint
	$(PY) -m pytest -q -n 2 --dist loadgroup

## Unit tests only (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

## The quality grid of bench/quality.py (about an hour on 2 CPU cores).
bench: $(STAMP)
	$(PY) bench/quality.py

## Structured pruning variants on smollm2-135m: quality, size, reload by stock transformers (about 35 min).
bench-structured: $(STAMP)
	$(PY) bench/structured.py --keep-folders $(HOME)/.cache/prunewise/bench-structured

clean:
	rm -rf $(VENV) out $(CHROMIUM)
