# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the whole suite).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: setup demo test bench clean

setup: $(VENV_STAMP)

# torch 2.13.0 goes in first, alone: with it installed, nothing else can pull a CUDA build of torch.
$(VENV_STAMP): pyproject.toml requirements.lock
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet torch==2.13.0
	.venv/bin/pip install --quiet -r requirements.lock
	.venv/bin/pip install --quiet --no-deps -e .
	touch $@

demo: setup
	.venv/bin/alignprop pipeline run --local --preset tiny --output outputs/demo

test: setup
	$(PY) -m pytest

bench: setup
	.venv/bin/alignprop bench

clean:
	rm -rf .venv outputs
