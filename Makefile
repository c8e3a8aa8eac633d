# Quick start:  `make demo` (synthetic data -> train -> evaluate -> predict, into out/)  /  `make test`.
# `make demo-convert` converts an original .pth and clicks once (the former demo).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GOLDEN ?= $(if $(SEMSAM_GOLDEN_DIR),$(SEMSAM_GOLDEN_DIR),../shared/golden)
# The checkpoint demo-convert converts: any original Semantic-SAM .pth with its YAML.
TORCH_CKPT ?= $(GOLDEN)/tiny_a/model.pth
REF_YAML   ?= $(GOLDEN)/tiny_a/config.yaml
IMAGE      ?= docs/assets/example.png
POINTS     ?= 0.45,0.55
OUT        ?= out
DEMO_STEPS ?= 1000

.PHONY: venv demo demo-convert test clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m semsam_jax.demo --output $(OUT) --steps $(DEMO_STEPS)

demo-convert: venv
	$(PY) -m semsam_jax.convert --torch-checkpoint $(TORCH_CKPT) --reference-config $(REF_YAML) \
	    --output $(OUT)/checkpoint --overwrite
	$(PY) -m semsam_jax predict --checkpoint $(OUT)/checkpoint --image $(IMAGE) \
	    --points "$(POINTS)" --coords relative --output-dir $(OUT)/predict

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
