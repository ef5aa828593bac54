# The two commands of the README: `make run` (the voice pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-all lint bootstrap proto bench k8s

bootstrap:
	@bash scripts/bootstrap.sh

# Full voice pipeline on the embedded CPU models: starts the Ray Serve app, asks it a spoken
# question over gRPC with the reference client, writes the spoken answer to out/answer.wav.
run: bootstrap
	$(VENV)/bin/voxserve demo --out out

test: bootstrap
	bash scripts/test.sh

# Everything, including suites marked slow.
test-all: bootstrap
	bash scripts/test.sh -m ""

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services deployments clients

proto:
	bash scripts/gen_proto.sh

k8s:
	$(PY) scripts/render_k8s.py
