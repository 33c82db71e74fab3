# Two entry points, both idempotent on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test deps dev browser clean
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that nothing else can pull a CUDA build.
$(VENV)/.deps: pyproject.toml constraints.txt | $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.deps
	$(PIP) -e '.[dev]'
	touch $@

deps: $(VENV)/.deps
dev: $(VENV)/.dev

# The flagship: the IOI study on SmolLM2, report in demo-out/report.html (a rerun replaces it).
demo: deps
	$(VENV)/bin/mechscope ioi --model smollm2-135m --out demo-out --overwrite

# Headless Chromium (Debian's package) for the reports' end-to-end tests.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: dev browser
	MECHSCOPE_REQUIRE_BROWSER=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
