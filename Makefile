# storvisor: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORVISOR_HOME ?= $(HOME)/.local/share/storvisor

# Debian packages: the run-time tools, then what the tests drive (real peers and guests) and
# what they need (fuse3 for power cuts, util-linux's losetup for loop devices; sg3-utils, fio,
# blkdiscard and modprobe for the LIO tests, which run this userspace in a guest); under CI=true
# a missing prerequisite fails its test (tests/prereq.py).
APT_RUN  := qemu-utils libnbd-bin util-linux
APT_TEST := qemu-utils qemu-system-x86 qemu-system-common nbdkit nbdkit-plugin-python \
            libnbd-bin python3-libnbd fio libvirt-clients libxml2-utils linux-image-amd64 \
            busybox-static gcc fuse3 util-linux e2fsprogs fdisk prometheus sg3-utils kmod

# libvirtd for the live attach test (tests/integrations/test_libvirt_live.py)
APT_TEST += libvirt-daemon libvirt-daemon-driver-qemu

# udev makes the /dev/disk/by-id links of SCSI LUNs in the guest of tests/openstack/guest_scsi.py
APT_TEST += udev

# The benchmarks' peers beyond the tests' (bench/tcmu_bench.py: tcmu-runner beside storvisor's
# TCMU backstore)
APT_BENCH := tcmu-runner

# The OpenStack integration tests (tests/openstack) run from their own virtualenv with the
# real cinder, os-brick and nova (requirements/openstack.txt), in their own pytest process:
# importing Cinder patches eventlet. Rebuilt only when the requirements file changes.
OS_VENV := .venv-openstack
OS_PY   := $(OS_VENV)/bin/python

.PHONY: run test lint typecheck pytest pytest-main pytest-openstack openstack-venv apt-run \
        apt-test venv clean bench mutants openapi

run: apt-run venv
	$(VENV)/bin/storvisor --home "$(STORVISOR_HOME)" serve --demo

test: apt-test venv lint typecheck pytest

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache --no-logo  # the layers (pyproject.toml)

typecheck: venv
	$(VENV)/bin/mypy

pytest: pytest-main pytest-openstack

# Whole modules go to PYTEST_WORKERS processes (pytest-xdist), the guest modules first; most
# tests wait on processes of their own (daemons, QEMU), so two workers use both cores.
PYTEST_WORKERS ?= 2

pytest-main: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Cinder's and Nova's global options clash: one process each
pytest-openstack: openstack-venv
	STORVISOR_OPENSTACK_TESTS=1 $(OS_PY) -m pytest -q -p no:cacheprovider \
		-W ignore::DeprecationWarning tests/openstack --ignore=tests/openstack/nova
	STORVISOR_OPENSTACK_TESTS=1 $(OS_PY) -m pytest -q -p no:cacheprovider \
		-W ignore::DeprecationWarning tests/openstack/nova

openstack-venv: $(OS_VENV)/.installed

$(OS_VENV)/.installed: requirements/openstack.txt
	test -x $(OS_PY) || $(PYTHON) -m venv $(OS_VENV)
	$(OS_PY) -m pip install -q --upgrade pip
	$(OS_PY) -m pip install -q --only-binary :all: -r requirements/openstack.txt
	$(OS_PY) -m pip install -q --no-deps -e .
	touch $@

# Byte-compiled once here: a process that may not write its own cache (PYTHONDONTWRITEBYTECODE)
# would otherwise compile every module it imports at each start (a CLI call, the daemon, each
# data plane).
venv: $(VENV)/.installed
	$(PY) -m compileall -q src >/dev/null

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# docs/openapi.json, generated from the route table (tests/api/test_openapi.py checks it)
openapi: venv
	PYTHONPATH=src $(PY) scripts/gen_openapi.py

apt-run:
	@scripts/apt-ensure $(APT_RUN)

apt-test:
	@scripts/apt-ensure $(APT_TEST)

bench: apt-test venv
	@scripts/apt-ensure $(APT_BENCH)
	$(PY) bench/run_all.py

# Each mutation of tests/mutants.toml, alone, against the tests that must kill it (in a
# temporary copy of the tree); fails if one survives. Results: docs/testing.md.
mutants: apt-test venv
	$(PY) scripts/mutants.py

clean:
	rm -rf $(VENV) $(OS_VENV) build *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
