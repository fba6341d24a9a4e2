# qwen3-sft developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= .cache/demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project with its test extras (re-runs only when pyproject changes)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install ## run the whole job on the tiny offline Qwen3-VL and the synthetic dataset (CPU, W&B offline)
	$(PY) -m job.tiny $(DEMO_DIR)
	rm -rf $(DEMO_DIR)/out
	WANDB_MODE=offline WANDB_DIR=$(DEMO_DIR) HF_HUB_OFFLINE=1 \
	SFT_MODEL_ID=$(DEMO_DIR)/model SFT_DATASET_URI=$(DEMO_DIR)/data SFT_OUTPUT_DIR=$(DEMO_DIR)/out SFT_RUN_ID=demo \
	SFT_MAX_STEPS=60 SFT_SAVE_STEPS=30 SFT_LEARNING_RATE=5e-3 SFT_PER_DEVICE_BATCH_SIZE=4 SFT_GRAD_ACCUM=1 \
	SFT_LOGGING_STEPS=10 SFT_WARMUP_RATIO=0.05 SFT_LORA_DROPOUT=0 SFT_MAX_LENGTH=512 SFT_GRADIENT_CHECKPOINTING=false \
	SFT_IMAGE_MIN_PIXELS=4096 SFT_IMAGE_MAX_PIXELS=16384 SFT_EVAL_MAX_NEW_TOKENS=16 SFT_EVAL_BATCH_SIZE=16 \
	SFT_DATALOADER_NUM_WORKERS=0 \
	$(VENV)/bin/qwen3-sft run
	@$(PY) -m job.report $(DEMO_DIR)/out/metrics.json

test: install ## run the test suite (offline, CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: help install demo test
