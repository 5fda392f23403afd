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

demo: $(STAMP)
	.venv/bin/dynllava generate --model tiny-random --image dynllava/data/demo.png \
		--prompt "Describe the image." --vision-keep 0.2 --text-keep 0.5 --max-new-tokens 24

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py --shape tiny --device cpu --batch 1 --new-tokens 256

clean:
	rm -rf .venv build *.egg-info
