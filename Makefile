# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,export,tensorboard,itk]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/segkit inspect data/nuclei
	$(BIN)/segkit train configs/nuclei-sigmoid.yaml --out $(DEMO)/train --device cpu --no-progress
	$(BIN)/segkit predict $(DEMO)/train/best data/nuclei/test/images $(DEMO)/masks --device cpu --no-progress
	$(BIN)/segkit evaluate $(DEMO)/train/best data/nuclei --split test --json $(DEMO)/scores.json --device cpu --no-progress
	$(BIN)/segkit visualize data/nuclei/test/images $(DEMO)/masks $(DEMO)/overlays --checkpoint $(DEMO)/train/best --truth data/nuclei/test/masks
	@echo
	@echo "demo done: checkpoint $(DEMO)/train/best, curves $(DEMO)/train/curves.png,"
	@echo "masks $(DEMO)/masks, scores $(DEMO)/scores.json, overlays $(DEMO)/overlays"

test: $(STAMP)
	$(BIN)/python -m pytest

# The default tier, then long end-to-end runs, fuzzing at scale and the tests on $(SEGKIT_DATA)
# (default ../shared/datasets).
test-all: $(STAMP)
	$(BIN)/python -m pytest --all

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf runs bench-out .pytest_cache
