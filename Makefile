# Set-up is part of each target: `make quickstart` and `make test` work on a fresh machine.
PYTHON ?= python
# One stamp per interpreter and set of extras, so switching venvs (or PYTHON=...) installs again.
# The quickstart needs only torch, pyyaml, safetensors and transformers (the `hf` extra); the
# test suite adds pytest, peft, bitsandbytes, triton, liger-kernel and ruff (the `test` extra).
PYHASH := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.executable.encode()).hexdigest()[:10])')
STAMP_QUICKSTART := .install.quickstart.$(PYHASH).stamp
STAMP_TEST := .install.test.$(PYHASH).stamp

.PHONY: install install-quickstart quickstart test test-kernels lint bench bench-real-size

$(STAMP_QUICKSTART): setup.cfg setup.py
	$(PYTHON) -m pip install -q -e '.[hf]'
	touch $(STAMP_QUICKSTART)

$(STAMP_TEST): setup.cfg setup.py
	$(PYTHON) -m pip install -q -e '.[hf,test]'
	touch $(STAMP_TEST) $(STAMP_QUICKSTART)

install-quickstart: $(STAMP_QUICKSTART)

install: $(STAMP_TEST)

# The main job: a LoRA finetune of a small Llama on the shipped data (CPU ok, no downloads).
quickstart: $(STAMP_QUICKSTART)
	$(PYTHON) scripts/finetune.py --config configs/quickstart.yaml

# Everything CI runs: the test suite, then the Triton kernels under the CPU interpreter.
test: $(STAMP_TEST)
	$(PYTHON) -m pytest -q tests
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/test_kernels.py tests/test_kernel_options.py tests/test_lora_bias.py tests/test_conv1d.py tests/test_qlora.py tests/test_recompute.py tests/test_silu_mul.py tests/test_dora.py tests/test_dora_kernels.py tests/test_segmented_lora.py tests/test_gather_mm.py tests/test_adapter_batch.py tests/test_adapter_batch_dora.py tests/test_fused_shrink.py tests/test_embedding_kernels.py tests/test_embedding_dora_kernels.py tests/test_fused_loss.py tests/test_fused_norm.py

lint: $(STAMP_TEST)
	$(PYTHON) -m ruff check automodel_lora tests scripts benchmarks

bench: $(STAMP_TEST)
	$(PYTHON) benchmarks/bench_lora.py

# The three real-model recipes at real size (random weights) against PEFT + Trainer: one GPU,
# ~3-4 minutes a run (estimate); RUNS=llama3_8b_lora picks one.
RUNS ?= llama3_8b_lora,llama3_8b_qlora,qwen2_5_7b_lora
bench-real-size: $(STAMP_TEST)
	$(PYTHON) benchmarks/bench_real_size.py --runs $(RUNS)
