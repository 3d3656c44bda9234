# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On x86_64 this torch/torchvision pair installs offline from the local pip cache here; elsewhere pip finds a build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-slow bench bench-tune bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) || $(PIP) install -q "torch>=2.2" "torchvision>=0.17"
	$(PIP) install -q -e ".[test,tensorboard,onnx]"
	touch $@

install: $(VENV)/.installed

# The main job: synthetic data -> FCOS-R50 teacher -> FCOS-R18 student alone and distilled with SAMKD -> COCO
# mAP of each -> the distilled student exported as a plain torchvision state dict + ONNX.
# --resume auto: a finished run is left as it is, an interrupted one continues.
demo: install
	$(VENV)/bin/samkd make-data --out data/demo --images 160 --val-images 40 --seed 0 --image-size 128
	$(VENV)/bin/samkd train -c configs/demo_teacher.yaml --resume auto
	$(VENV)/bin/samkd train -c configs/demo_student.yaml --resume auto
	$(VENV)/bin/samkd distill -c configs/demo_distill.yaml --resume auto
	$(VENV)/bin/samkd export-student -c configs/demo_distill.yaml --checkpoint runs/demo_student/student.pt \
		--out runs/demo_student/export --onnx
	$(PY) -m samkd.cli summary runs/demo_teacher runs/demo_student_alone runs/demo_student

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(VENV)/bin/samkd bench --out benchmarks --jobs 2

# The tuning behind SAMKD's defaults ran at batch 8 (benchmarks/tuning.md); this repeats it exactly.
bench-tune: install
	$(VENV)/bin/samkd bench --tune --batch-size 8 --out benchmarks --jobs 2

bench-quick: install
	$(VENV)/bin/samkd bench --quick --out /tmp/samkd-bench-quick

clean:
	rm -rf $(VENV) runs data/demo
