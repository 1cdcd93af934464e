# Two commands on a fresh machine: `make run` (the agent on its embedded default)
# and `make test` (the whole test suite). Each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test packages deb bench bench-aws bench-fleet bench-fluentd bench-idle bench-postmortem bench-scale clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

# Always the embedded default, even where /etc/shipper/shipper.toml exists (e.g. the .deb is installed).
run: $(VENV)/.installed-run
	mkdir -p logs
	$(BIN)/shipper run --default

# The Debian packages some tests need are installed first when missing (tests/system-packages.sh).
test: $(VENV)/.installed-test
	tests/system-packages.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# dist/: the .deb for amd64 and arm64, the .rpm for x86_64 and aarch64, each for CPython 3.11-3.13
# (needs dpkg-deb and rpmbuild: tests/system-packages.sh installs them; the wheels come from the index).
packages: $(VENV)/.installed-run
	PYTHON=$(BIN)/python packaging/build-packages.sh dist

# Only this machine's .deb.
deb: $(VENV)/.installed-run
	PYTHON=$(BIN)/python packaging/build-deb.sh dist

bench: $(VENV)/.installed-test
	$(BIN)/python bench/throughput.py

bench-aws: $(VENV)/.installed-test
	$(BIN)/python bench/aws.py

bench-fluentd: $(VENV)/.installed-test
	$(BIN)/python bench/fluentd.py

bench-idle: $(VENV)/.installed-test
	$(BIN)/python bench/idle.py

bench-fleet: $(VENV)/.installed-test
	$(BIN)/python bench/fleet.py

bench-postmortem: $(VENV)/.installed-test
	$(BIN)/python bench/postmortem.py

# SCALE_ARGS, e.g. SCALE_ARGS="--files 100000" or "--load random --window 10"
bench-scale: $(VENV)/.installed-test
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) shipper-data dist
