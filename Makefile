# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On x86_64 this torch/torchvision pair installs offline from the local pip cache here; elsewhere pip finds a build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-quick test test-slow bench bench-tune bench-paper bench-yolo bench-quick bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) || $(PIP) install -q "torch>=2.2" "torchvision>=0.17"
	$(PIP) install -q -e ".[test,tensorboard,onnx,timm,yolo]"
	touch $@

install: $(VENV)/.installed

# The main job: synthetic data -> FCOS-R50 teacher -> FCOS-R18 student alone and distilled with SAMKD (same data
# and steps) -> COCO mAP of each -> the distilled student exported (torchvision state dict + ONNX) -> its
# detections drawn on an image. A finished demo is printed again, not re-run (samkd demo --overwrite re-runs it).
demo: install
	$(VENV)/bin/samkd demo --out runs/demo

demo-quick: install
	$(VENV)/bin/samkd demo --quick --out runs/demo-quick --overwrite

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The benchmark tables, one detector family at a time (each merges into benchmarks/results.md).
bench: install bench-tune bench-paper bench-yolo
	$(VENV)/bin/samkd bench --suite all --out benchmarks --jobs 2

# The same weight grid for every method on validation data (benchmarks/tuning.md).
bench-tune: install
	$(VENV)/bin/samkd bench --tune --out benchmarks --jobs 2

# The paper's regime (ImageNet Lite2 teacher -> Lite0 student): its own weight grid (extended at the edges), SAMKD's
# design choices on validation data, then the FCOS, RetinaNet and Faster R-CNN tables and FCOS at 256 px. Runs are
# cached: a rerun resumes. The grid's best factors go into PAPER_TUNED_WEIGHTS (samkd/bench/methods.py) before the
# tables can run.
bench-paper: install
	$(VENV)/bin/samkd bench --tune --suite paper_fcos --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --design --suite paper_fcos --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --suite paper_fcos --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --suite paper_retinanet --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --suite paper_faster_rcnn --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --suite paper_fcos_256 --out benchmarks --jobs 2

# YOLO (the yolo extra): SAMKD's choices on YOLO's validation data, then the YOLO11s -> YOLO11n table with
# ultralytics' own trainer beside it (about 80 CPU minutes per data seed on 2 cores; cached, resumes).
bench-yolo: install
	$(VENV)/bin/samkd bench --design --suite yolo --out benchmarks --jobs 2
	$(VENV)/bin/samkd bench --suite yolo --out benchmarks --jobs 2

bench-quick: install
	$(VENV)/bin/samkd bench --quick --out /tmp/samkd-bench-quick

# The GPU cost profile (a CUDA machine; about 8 minutes on an H100, most of it compiling): step ratios, loss
# shares and peak memory at COCO scale (gpu.md), FCOS again with the losses compiled (gpu_compiled_losses.md), and
# every loss's kernel count and time, eager and SAMKD compiled (profile_gpu.md). benchmarks/speed.md reads them.
bench-gpu: install
	$(VENV)/bin/samkd bench --costs --device cuda --image-size 800 --out benchmarks
	$(VENV)/bin/samkd bench --costs --device cuda --image-size 800 --archs fcos --methods fitnet mgd samkd \
		--compile-losses --out benchmarks
	PYTHONPATH=. $(PY) benchmarks/profile_losses.py --device cuda --sizes 800x2 --reps 10 --compile samkd \
		--json benchmarks/profile_gpu.json | tee benchmarks/profile_gpu.md

clean:
	rm -rf $(VENV) runs
