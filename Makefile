# The two commands a newcomer needs (see README.md):
#   make demo   - generate images from a prompt with the shipped weights
#   make test   - unit tests + every lesson notebook under nbval, in smoke mode
# Both create .venv and install into it on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, on its own: on the course machines these exact builds
# lie on local disk; elsewhere override, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PROMPT ?= a red circle above a blue square
OUT    ?= outputs/demo.png
MODEL  ?= scenes

.PHONY: install demo test test-fast lessons clean help

help:
	@echo "make demo   - generate $(OUT) from PROMPT=\"$(PROMPT)\" with MODEL=$(MODEL) (scenes or emoji)"
	@echo "make test   - unit tests + lessons (smoke mode)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# `make demo` runs the whole shipped cascade (32 px base -> 64 px super-resolution);
# `make demo STAGES=base` stops after the base stage (32 px, a few seconds).
STAGES ?= all
demo: install
	$(VENV)/bin/mini-imagen generate "$(PROMPT)" --model $(MODEL) --out $(OUT) $(if $(filter base,$(STAGES)),--base-only,)

test: install
	MINI_IMAGEN_SMOKE=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -q -p no:cacheprovider

test-fast: install
	MINI_IMAGEN_SMOKE=1 $(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
