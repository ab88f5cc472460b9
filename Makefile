# The one vocabulary: CI calls these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck migrate seed fuzz format clean bench bench-analytics screenshots deploy docker-build docker-up docker-down docker-logs

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/wallet run

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check gateway admin tests bench
	$(BIN)/ruff format --check gateway admin tests bench

format: install
	$(BIN)/ruff format gateway admin tests bench
	$(BIN)/ruff check --fix gateway admin tests bench

typecheck: install
	$(BIN)/mypy

migrate: install
	$(BIN)/wallet migrate

seed: install
	$(BIN)/wallet seed

# Fuzz the admin API of a running `make run` from its OpenAPI document (see README).
fuzz: install
	$(BIN)/python -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

# Redraw the console's pictures (docs/console-*.png) in headless Chromium, from a test database
# (needs chromium and chromium-driver, as the browser tests do).
screenshots: install
	WALLET_SCREENSHOTS=1 WALLET_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests/test_console_browser.py -k screenshots $(PYTEST_ARGS)

# Gateway vs a direct call and a bare aiohttp proxy, on loopback (see bench/bench.py).
bench: install
	$(BIN)/python -m bench.bench

# The analytics endpoints on 10 million generated usage records, in a scratch database
# (see bench/analytics.py); results in bench/analytics-results.md.
bench-analytics: install
	$(BIN)/python -m bench.analytics

# Containers (need a Docker engine; `make test` never calls these). See README "Deployment".
IMAGE ?= api-key-wallet:0.1.0
COMPOSE ?= docker compose

docker-build:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

docker-up:
	$(COMPOSE) up -d --build

docker-down:
	$(COMPOSE) down

docker-logs:
	$(COMPOSE) logs -f --tail=200

# Build the image and (re)start the compose stack: migrations first, then the apps.
deploy: docker-build
	$(COMPOSE) up -d

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
