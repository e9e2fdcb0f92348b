# trolley-etl: `make demo` pulls a demo extraction from a local archive, `make test` runs the tests.
# Both set everything up on a fresh Debian/Ubuntu machine: Orthanc from apt, Python packages in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ORTHANC_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
DEMO_OUT ?= demo-data
PEERS_VENV ?= bench/.peers-venv
BENCH_ARGS ?=
SCALE_BENCH_ARGS ?=

.PHONY: setup system-packages test-packages test test-fast lint format demo demo-archive bench clean

system-packages:
	@if ! command -v Orthanc >/dev/null 2>&1 || [ ! -f $(ORTHANC_PLUGIN) ] \
	    || ! command -v stunnel4 >/dev/null 2>&1 \
	    || ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  echo "Installing Orthanc, its DICOMweb plugin, stunnel4 and python3-venv with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    orthanc orthanc-dicomweb python3-venv stunnel4; \
	fi

# Only the tests need a browser: the HTML report is checked in headless Chromium.
test-packages:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  echo "Installing Chromium (headless, for the HTML report test) with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: system-packages $(VENV)/.installed

test: setup test-packages
	$(BIN)/python -m pytest

# The inner loop: every test that needs no server (no Orthanc, no qrscp, no local HTTP server)
# and starts no other process; tests/conftest.py fails a test that does so without its marker.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not archive and not subprocess and not slow"

lint: setup
	$(BIN)/ruff check trolley_etl tests bench
	$(BIN)/ruff format --check trolley_etl tests bench
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format trolley_etl tests bench
	$(BIN)/ruff check --fix trolley_etl tests bench

demo: setup
	$(BIN)/python -m trolley_etl._harness.demo --manifest manifests/demo.yaml

# The seeded demo archive on the demo manifest's addresses, until Ctrl-C: try plan, lock,
# run, status, report and doctor by hand from another terminal (after `. .venv/bin/activate`).
demo-archive: setup
	$(BIN)/python -m trolley_etl._harness.demo_archive --manifest manifests/demo.yaml

# The peer tools get their own virtual environment, so their dependencies never mix with ours.
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q dicomtrolley dicomweb-client
	touch $@

# Throughput, memory and resume cost against the wire limit and peer tools (not part of `test`).
# A quick pass on about 100 MB: make bench BENCH_ARGS="--scale 0.1"
bench: setup $(PEERS_VENV)/.installed
# byte-compiled first, as an installed wheel is: under PYTHONDONTWRITEBYTECODE every measured
# process would otherwise compile the package again (about 0.1 s of each run's fixed cost)
	$(BIN)/python -m compileall -q trolley_etl
	$(BIN)/python bench/run_bench.py --peers-python $(PEERS_VENV)/bin/python $(BENCH_ARGS)
# then the scaling rows: Dask executor (1 and 2 worker processes), S3 root against local disk
	$(BIN)/python bench/scale_bench.py $(SCALE_BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(PEERS_VENV) .pytest_cache .mypy_cache .ruff_cache
