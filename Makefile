# The two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= edge,cloud,partition,dev

.PHONY: install test lint demo bundle clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The package build (setup.py) generates the gRPC code; an editable install does not rebuild, so this
# regenerates it from protos/ whenever the .proto changes.
splitclip/wire/PROTO_SHA256: $(STAMP) $(wildcard protos/*.proto)
	$(PY) -m splitclip.protogen

install: $(STAMP) splitclip/wire/PROTO_SHA256

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy splitclip

test: lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/splitclip demo

clean:
	rm -rf $(VENV) bundles scratch .pytest_cache .ruff_cache .mypy_cache

# Container images (podman; not part of `make test`): docs/images.md.
.PHONY: images image-test
images:
	deploy/images/build.sh

# builds both images, then a frame in split mode through the cloud container and one answered locally
# after it is stopped; needs the demo bundle (`make demo`)
image-test:
	deploy/images/image-test.sh
