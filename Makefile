PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench fuzz clean

N ?= 1000

$(STAMP): pyproject.toml setup.py $(wildcard qcompile/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel on local disk, never a CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0 'setuptools>=68' wheel
	# The native kernels (qcompile/csrc) compile against that torch: no isolated build env,
	# which would fetch a second torch. A compile error stops here.
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m examples.demo

# One pytest worker per core (tests/conftest.py gives each worker its share of torch's threads):
# most of the suite is single-threaded Python (export, passes, ONNX Runtime sessions).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:logging -n auto --dist worksteal tests

fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m tests.fuzz $(N)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.compile_time

clean:
	rm -rf $(VENV) dumps build *.egg-info qcompile/_native*.so
