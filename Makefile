# The two commands of the README, `make run` and `make test`, and `make test-fast` for development.
# All create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build this project is developed with; elsewhere any torch >= 2.5 works.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test test-fast lint format clients browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q "torch>=2.5"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/truffula serve --adapter-root examples/adapters --preload-adapter french --preload-adapter caps --preload-adapter pirate

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The browser test drives Debian's chromium through Playwright (which cannot download browsers
# here): install the apt package once, and playwright if the venv predates it.
browser: $(STAMP)
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q "playwright>=1.45"
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
		$$APT install -y chromium || { $$APT update && $$APT install -y chromium; }; \
	fi

test: $(STAMP) lint browser
	$(VENV)/bin/pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Everything but the tests marked `slow` (those that load the default model or start a server):
# under a minute on two CPU cores, no lint, no browser.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .venvs .pytest_cache .ruff_cache test-artifacts
