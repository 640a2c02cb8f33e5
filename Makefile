# The two commands of the README: `make demo` and `make test`. Both create .venv and install everything first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A Python 3.12 that really runs: pyenv's install first (its shim may be inactive), then python3.12 on the PATH.
PYTHON312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3 2>/dev/null) python3.12; do \
                 "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)

# ROS 2 discovery stays on this machine; each run gets its own domain.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= $(shell echo $$(( $$$$ % 200 + 10 )))
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# torch's OpenMP threads spin-wait by default, which starves the other processes on a 2-core machine.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test setup clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install it, e.g. 'pyenv install 3.12')"; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(VENV)/bin/vla-stack demo

test: setup
	$(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
