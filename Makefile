# Set-up and entry points. Every target creates .venv when missing.
# torch is pinned to the CPU build on local disk here; GPU users install their CUDA build of torch first
# (pip install torch --index-url ...), then `pip install -e .` keeps it (pyproject allows a range).
PY        := .venv/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP     := .venv/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

DEMO_DIR  := .venv/demo
DEMO_DATA := $(DEMO_DIR)/shapes_test_2000.parquet
DYNLLAVA  := .venv/bin/dynllava

# The main job on the embedded `tiny` model: caption 2,000 held-out synthetic scenes on a local Ray
# (configs/caption.yaml: learned vision 0.2 / text 0.5), print the job summary, then grade the captions.
demo: $(STAMP)
	test -f $(DEMO_DATA) || $(DYNLLAVA) data shapes --n 2000 --split test --task caption --output $(DEMO_DATA)
	rm -rf $(DEMO_DIR)/captions
	$(DYNLLAVA) caption --input $(DEMO_DATA) --output $(DEMO_DIR)/captions --model tiny
	$(DYNLLAVA) grade --input $(DEMO_DATA) --output $(DEMO_DIR)/captions

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py --shape tiny --device cpu --batch 1 --new-tokens 256

clean:
	rm -rf .venv build *.egg-info
