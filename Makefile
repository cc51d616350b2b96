# `make serve` and `make test` work on a fresh machine: they create .venv when missing and install
# the project (pip, from pyproject.toml) before doing anything else.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install serve test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/serve run serve_config.yaml

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
