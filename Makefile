# Ops-Core: `make run` serves on 127.0.0.1:8000 with SQLite; `make test` runs the whole suite.
#   make run PORT=8080 HOST=0.0.0.0   another port / every interface (else OPSCORE_HOST/OPSCORE_PORT, .env included)
#   make simulate [PORT=8080]         a stand-in AgentKit playing agents against it (SIMULATE_ARGS="--agents 5")
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?=
PORT ?=

.PHONY: run simulate test check lint bench diagrams screenshots docker clean

$(BIN)/.installed: pyproject.toml requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Ops-Core needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(BIN)/.test-installed: $(BIN)/.installed requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

# First run: writes OPSCORE_API_KEY and OPSCORE_WEBHOOK_SECRET into .env (shown once on stderr).
# stdout is the service's JSON log and nothing else (the command itself is not echoed).
run: $(BIN)/.installed
	@$(BIN)/opscore serve --generate-key $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# A stand-in AgentKit for the service `make run` started (same .env; same HOST/PORT if you gave any).
simulate: $(BIN)/.installed
	@$(if $(HOST),OPSCORE_HOST=$(HOST)) $(if $(PORT),OPSCORE_PORT=$(PORT)) $(BIN)/opscore simulate $(SIMULATE_ARGS)

lint: $(BIN)/.test-installed
	$(BIN)/ruff check opscore tests benchmarks
	$(BIN)/ruff format --check opscore tests benchmarks
	$(BIN)/mypy opscore

test: $(BIN)/.test-installed lint
	$(BIN)/pytest --cov=opscore --cov-report=term --cov-report=xml $(PYTEST_ARGS)

check: test

# Regenerate diagrams/ from opscore/machines.py (SVG needs Graphviz's dot: apt-get install graphviz).
# tests/test_diagrams.py fails when the committed files are stale.
diagrams: $(BIN)/.installed
	$(BIN)/opscore diagram --all --format mermaid --out diagrams
	$(BIN)/opscore diagram --all --format svg --out diagrams

# The console's pictures in the README (docs/console/*.png), taken by its browser tests in Debian's
# chromium (apt-get install chromium; never a browser download).
screenshots: $(BIN)/.test-installed
	OPSCORE_SCREENSHOTS=docs/console $(BIN)/pytest -q -p no:cacheprovider tests/browser/test_console.py

# One table of every scenario (benchmarks/run.py), also written to benchmarks/results/latest.json.
bench: $(BIN)/.test-installed
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq wrk)
	PYTHONPATH=. $(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage coverage.xml
