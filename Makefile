# Set-up is part of each target: `make quickstart` and `make test` work on a fresh machine.
PYTHON ?= python
# one stamp per interpreter, so switching venvs (or PYTHON=...) installs again
STAMP := .install.$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.executable.encode()).hexdigest()[:10])').stamp

.PHONY: install quickstart test test-kernels lint bench

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: a LoRA finetune of a small Llama on the shipped data (CPU ok, no downloads).
quickstart: $(STAMP)
	$(PYTHON) scripts/finetune.py --config configs/quickstart.yaml

# Everything CI runs: the test suite, then the Triton kernels under the CPU interpreter.
test: $(STAMP)
	$(PYTHON) -m pytest -q tests
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/test_kernels.py tests/test_kernel_options.py tests/test_qlora.py tests/test_recompute.py

lint: $(STAMP)
	$(PYTHON) -m ruff check automodel_lora tests scripts benchmarks

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_lora.py
