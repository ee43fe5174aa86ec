# Two commands for a new clone:  `make run` (train the tiny MoE, tracked in MLflow) and
# `make test` (the test suite). Both create or reuse .venv and install what they need,
# CPU torch first so pip never pulls a multi-GB CUDA build by accident.
VENV ?= .venv
PY := $(VENV)/bin/python
# Users with a GPU: `make setup TORCH_SPEC="torch==2.13.0"` from their CUDA index, or any torch>=2.5.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= conf/tiny.yaml
OFFLINE := HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

.PHONY: setup run test bench mlflow-ui clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) cli.py fit --config $(CONFIG)

test: setup
	$(OFFLINE) $(PY) -m pytest

bench: setup
	$(PY) benchmarks/moe_layer.py
	$(OFFLINE) $(PY) benchmarks/train_tiny.py

# MLflow 3 opens in its GenAI view; this link opens the "Model training" view of the runs.
mlflow-ui: setup
	@echo "MLflow UI: http://localhost:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf .cache checkpoints mlruns mlflow.db
