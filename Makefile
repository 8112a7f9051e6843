# storvisor: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORVISOR_HOME ?= $(HOME)/.local/share/storvisor

# Debian packages: the run-time tools, then what the tests drive (real peers and guests) and
# what they need (fuse3 for power cuts, util-linux's losetup for loop devices); under CI=true
# a missing prerequisite fails its test (tests/prereq.py).
APT_RUN  := qemu-utils libnbd-bin util-linux
APT_TEST := qemu-utils qemu-system-x86 qemu-system-common nbdkit nbdkit-plugin-python \
            libnbd-bin python3-libnbd fio libvirt-clients libxml2-utils linux-image-amd64 \
            busybox-static gcc fuse3 util-linux e2fsprogs fdisk prometheus

.PHONY: run test lint typecheck pytest apt-run apt-test venv clean bench mutants

run: apt-run venv
	$(VENV)/bin/storvisor --home "$(STORVISOR_HOME)" serve --demo

test: apt-test venv lint typecheck pytest

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache --no-logo  # the layers (pyproject.toml)

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

apt-run:
	@scripts/apt-ensure $(APT_RUN)

apt-test:
	@scripts/apt-ensure $(APT_TEST)

bench: venv
	$(PY) bench/run_all.py

# Each mutation of tests/mutants.toml, alone, against the tests that must kill it (in a
# temporary copy of the tree); fails if one survives. Results: docs/testing.md.
mutants: apt-test venv
	$(PY) scripts/mutants.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
