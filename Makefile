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

DEMO_IMAGE := .venv/demo.png

# Until the trained `tiny` checkpoint ships, `tiny` is a random-weight shape (configs/models/tiny.yaml):
# the answer is noise, but the pruning, the sparse cache and the reported savings are real.
demo: $(STAMP)
	$(PY) -c "from PIL import Image, ImageDraw; i = Image.new('RGB', (336, 336), 'white'); d = ImageDraw.Draw(i); \
	d.ellipse((40, 40, 140, 140), fill='red'); d.rectangle((180, 60, 300, 180), fill='blue'); i.save('$(DEMO_IMAGE)')"
	.venv/bin/dynllava generate --model tiny --image $(DEMO_IMAGE) --prompt "Describe the image." \
		--vision-keep 0.2 --text-keep 0.5 --vision-scorer fastv --text-scorer recent --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py --shape tiny --device cpu --batch 1 --new-tokens 256

clean:
	rm -rf .venv build *.egg-info
