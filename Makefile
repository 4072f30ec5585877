# Two commands do everything on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test lint protos bench clean

install:
	./scripts/install.sh

serve: install
	$(VENV)/bin/editserve serve $(ARGS)

test: install
	./scripts/ensure_postgres.sh || true
	$(PY) -m ruff check service tests bench scripts
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check service tests bench scripts

protos:
	$(PY) scripts/gen_protos.py

bench: install
	$(PY) bench/serve_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
