# qwen3-sft developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= .cache/demo
PYTEST_ARGS ?=
# make test-image-pins: a Python 3.12 venv with docker/constraints.txt's exact versions (the image's, torch 2.8.0 CPU).
# python3.12 on the PATH, else pyenv's 3.12 (a pyenv shim answers "command not found" unless 3.12 is selected).
IMAGE_PINS_PYTHON ?= $(or $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null),$(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),python3.12)
IMAGE_PINS_VENV ?= .cache/venv-image-pins
# Image and cluster submission (make image / push / submit / image-smoke).
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
IMAGE ?= qwen3-sft:$(IMAGE_TAG)
RUN_ID ?= qwen3-sft-$(IMAGE_TAG)
DATASET ?=
WAIT_TIMEOUT ?= 24h
# The oldest Kubernetes the manifests target (podFailurePolicy is GA from 1.31) and the newest schema bundled.
K8S_VERSIONS ?= 1.31.0 1.37.0
K8S_BUILTIN := k8s/job.yaml k8s/configmap.yaml k8s/secret.example.yaml k8s/serviceaccount.yaml
# make device-kit: standard library and pip only, so it needs no `make install` (the .venv's Python when there is one).
KIT_PY := $(if $(wildcard $(PY)),$(PY),python3)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project with its test extras at the locked versions (re-runs when pyproject.toml or requirements.lock change)

# requirements.lock pins every package for Python 3.11 and 3.12 (make lock regenerates it); as constraints, so a
# pin another platform does not need (nvidia-*) is skipped there. Python 3.10: see docs/development.md.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

lock: install ## regenerate docker/constraints.txt (the image) and requirements.lock (make install, CI) from pyproject.toml
	$(PY) scripts/lock.py

# The demo's settings that training, eval and export share (export reuses the run's post-eval only when they match).
DEMO_ENV := WANDB_MODE=offline WANDB_DIR=$(DEMO_DIR) HF_HUB_OFFLINE=1 \
	SFT_MODEL_ID=$(DEMO_DIR)/model SFT_DATASET_URI=$(DEMO_DIR)/data SFT_OUTPUT_DIR=$(DEMO_DIR)/out SFT_RUN_ID=demo \
	SFT_MAX_LENGTH=512 SFT_IMAGE_MIN_PIXELS=4096 SFT_IMAGE_MAX_PIXELS=16384 SFT_EVAL_MAX_NEW_TOKENS=16 \
	SFT_EVAL_BATCH_SIZE=16

demo: install ## run the whole job on the tiny offline Qwen3-VL and the synthetic dataset (CPU, W&B offline)
	$(PY) -m job.demo.tiny $(DEMO_DIR)
	rm -rf $(DEMO_DIR)/out
	$(DEMO_ENV) \
	SFT_MAX_STEPS=60 SFT_SAVE_STEPS=30 SFT_LEARNING_RATE=5e-3 SFT_PER_DEVICE_BATCH_SIZE=4 SFT_GRAD_ACCUM=1 \
	SFT_LOGGING_STEPS=10 SFT_WARMUP_RATIO=0.05 SFT_LORA_DROPOUT=0 SFT_GRADIENT_CHECKPOINTING=false \
	SFT_DATALOADER_NUM_WORKERS=0 SFT_EVAL_STEPS=20 \
	$(VENV)/bin/qwen3-sft run
	@$(PY) -m job.demo.report $(DEMO_DIR)/out/metrics.json

export: install ## after make demo: merge the demo run's adapter into the tiny base, verify it, write $(DEMO_DIR)/out/merged
	@test -f $(DEMO_DIR)/out/adapter/adapter_config.json || { echo "make export: run make demo first" >&2; exit 2; }
	$(DEMO_ENV) $(VENV)/bin/qwen3-sft export

# lint-py runs beside the suite, at a lower priority (it fills the cores the suite leaves idle); its output is printed
# after the suite's, and either failing fails the target.
test: install ## ruff and mypy (lint-py) beside the whole test suite (offline, CPU): in-process tests, then the shared job runs (slow)
	@lint_log=$$(mktemp); (nice -n 10 bash -c '$(LINT_PY)' >"$$lint_log" 2>&1) & lint=$$!; \
	$(PY) -m pytest $(PYTEST_ARGS); tests=$$?; wait $$lint; linted=$$?; \
	echo "--- make lint-py (exit $$linted):"; cat "$$lint_log"; rm -f "$$lint_log"; \
	test $$tests -eq 0 -a $$linted -eq 0

# The image's pins minus the GPU-only packages (flash-attn, liger-kernel: the [gpu] extra is not installed here).
$(IMAGE_PINS_VENV)/.installed: docker/constraints.txt pyproject.toml
	rm -rf $(IMAGE_PINS_VENV)
	$(IMAGE_PINS_PYTHON) -m venv $(IMAGE_PINS_VENV)
	$(IMAGE_PINS_VENV)/bin/python -m pip install -q -c docker/constraints.txt pip setuptools wheel
	$(IMAGE_PINS_VENV)/bin/python -m pip install -q --no-build-isolation -c docker/constraints.txt -e '.[test]'
	$(IMAGE_PINS_VENV)/bin/python -m pip check
	touch $@

test-image-pins: $(IMAGE_PINS_VENV)/.installed ## the fast tier and one end-to-end run under the image's pins (Python 3.12, torch 2.8.0; ~3 GB download)
	$(IMAGE_PINS_VENV)/bin/python -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
	$(IMAGE_PINS_VENV)/bin/python -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)
	$(IMAGE_PINS_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_end_to_end.py $(PYTEST_ARGS)

test-fast: install ## run only the in-process tests (no job subprocesses): pytest -m "not slow"
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Config in pyproject.toml ([tool.ruff], [tool.mypy]); both are pinned in the test extra.
LINT_PY = $(VENV)/bin/ruff check . && $(VENV)/bin/mypy
lint-py: install ## ruff on the repository and mypy on job/ (zero findings; make test runs this beside the suite)
	$(LINT_PY)

docs: install ## rewrite the settings tables of docs/configuration.md from the settings' declarations (job/config/sections/)
	$(PY) -m job.config.docs --write docs/configuration.md

lint: install lint-py ## lint-py, then docker/Dockerfile, k8s/ and the retrain workflow offline (hadolint, kubernetes-validate, check-jsonschema, zizmor)
	$(VENV)/bin/hadolint --config .hadolint.yaml docker/Dockerfile
	for v in $(K8S_VERSIONS); do $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_BUILTIN) || exit 1; done
	set -o pipefail; $(PY) k8s/render.py --image lint --run-id lint --dataset s3://lint/data \
	  | $(VENV)/bin/kubernetes-validate --strict --quiet -k $(firstword $(K8S_VERSIONS)) -
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/retrain.yml
	$(VENV)/bin/zizmor --offline .github/workflows/retrain.yml

device-kit: ## download the GPU proof kit into .cache/device-kit: the wheels a CUDA box with torch lacks (<= 60 MiB; see docs/development.md)
	$(KIT_PY) -m benchmarks.device.kit download

image: ## docker build the GPU image as $(IMAGE) (needs Docker; MAX_JOBS=N for a flash-attn source build)
	docker build -f docker/Dockerfile -t $(IMAGE) \
	  --build-arg MAX_JOBS=$${MAX_JOBS:-4} \
	  --build-arg VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
	  --build-arg SOURCE=$$(git remote get-url origin 2>/dev/null | sed -E 's#//[^/@]*@#//#' || echo unknown) \
	  .

push: ## docker push $(IMAGE); name a registry: make push IMAGE=REGISTRY/qwen3-sft:TAG
	docker push $(IMAGE)

submit: install ## kubectl apply k8s/ with IMAGE, RUN_ID and DATASET filled in, wait, exit with the job's exit code
	@test -n "$(DATASET)" || { echo "make submit: set DATASET=s3://... (and IMAGE=REGISTRY/qwen3-sft:TAG)" >&2; exit 2; }
	set -o pipefail; $(PY) k8s/render.py --image "$(IMAGE)" --run-id "$(RUN_ID)" --dataset "$(DATASET)" | kubectl apply -f -
	bash k8s/wait.sh "$(RUN_ID)" "$(WAIT_TIMEOUT)"

preflight: install ## qwen3-sft preflight with your SFT_* environment (needs SFT_DATASET_URI, a local path)
	$(VENV)/bin/qwen3-sft preflight

# The demo's data and processor, built inside the container; --gpus is not needed for config and preflight.
SMOKE_ENV := -e HF_HUB_OFFLINE=1 -e WANDB_MODE=offline -e SFT_MODEL_ID=/tmp/demo/model \
	-e SFT_DATASET_URI=/tmp/demo/data -e SFT_OUTPUT_DIR=/tmp/demo/out -e SFT_MAX_LENGTH=512 \
	-e SFT_IMAGE_MIN_PIXELS=4096 -e SFT_IMAGE_MAX_PIXELS=16384
image-smoke: image ## build the image, then run qwen3-sft config and preflight on the demo data inside it (needs Docker)
	docker run --rm $(IMAGE) config
	docker run --rm --entrypoint python $(IMAGE) -c \
	  "import torch, importlib.metadata as m; assert torch.version.cuda.startswith('12.'), torch.version.cuda; \
	  print('torch', torch.__version__, 'cuda', torch.version.cuda, 'flash-attn', m.version('flash-attn'))"
	docker run --rm $(SMOKE_ENV) --entrypoint tini $(IMAGE) -- \
	  sh -c 'python -m job.demo.tiny /tmp/demo && exec qwen3-sft preflight'

.PHONY: help install lock demo export test test-fast test-image-pins docs lint lint-py device-kit image push submit preflight \
	image-smoke
