# Two entry points for a fresh machine: `make speedrun` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install install-test browser fonts speedrun smoke demo test lint test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python fonts
	$(PIP) install -e .
	$(PIP) install --no-deps --no-compile -r requirements-corpus.txt

# llama-cpp-python (test extra) compiles llama.cpp from source; its multimodal library is not needed here.
install-test: $(BIN)/python browser fonts
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(PIP) install -e '.[test]'
	$(PIP) install --no-deps --no-compile -r requirements-corpus.txt

# The web-chat test drives Debian's Chromium with Playwright (Playwright's own browser download is not used).
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null) \
		|| echo "warning: /usr/bin/chromium missing and not root: the browser test will be skipped"; }

# The visual tasks render Chinese words with a CJK font (nanoseek.tasks.visual); Debian's WenQuanYi Zen Hei.
fonts:
	@test -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq fonts-wqy-zenhei >/dev/null) \
		|| echo "warning: fonts-wqy-zenhei missing and not root: Chinese visual tasks will refuse to render"; }

speedrun: install
	$(BIN)/nanoseek speedrun --preset cpu --out runs/cpu

smoke: install
	$(BIN)/nanoseek speedrun --preset smoke --out runs/smoke

demo: install
	$(BIN)/nanoseek demo

test: install-test lint
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

test-all: install-test
	$(BIN)/python -m pytest -q -m ''

bench: install-test
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/moe_vs_dense.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
