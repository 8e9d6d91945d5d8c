# `make test` and `make demo` work on a fresh machine: each builds .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bncheck-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: test demo lint format samples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; a bare "torch" would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider

# Findings exit 1 by design; the demo shows them and goes on (--fail-on never).
demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/bncheck inspect sample_models/resnet.onnx
	$(VENV)/bin/bncheck inspect sample_models/patterns.pt2
	$(VENV)/bin/bncheck inspect sample_models/broken.pt --arch bncheck.samples:broken_model --fail-on never
	$(VENV)/bin/bncheck fold sample_models/patterns.onnx -o out/patterns_folded.onnx
	$(VENV)/bin/bncheck check sample_models/resnet.onnx --data sample_models/resnet_calib.npy
	$(VENV)/bin/bncheck recalibrate sample_models/resnet.pt2 --data sample_models/resnet_calib.npy \
		--labels sample_models/resnet_labels.npy -o out/resnet_recalibrated.pt2
	$(VENV)/bin/bncheck optimize sample_models/resnet.pt2 --data sample_models/resnet_calib.npy \
		-o out/resnet_optimized.pt2

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

samples: $(STAMP)
	$(PY) -m bncheck.samples sample_models

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
