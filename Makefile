# The two entry points: `make run` (the main job) and `make test` (the whole suite).
# Each creates .venv and installs the package on first use, at the tested
# versions of constraints.txt (setup.py states the compatible ranges); reruns
# reuse it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,report,digits,slurm]'
	touch $(STAMP)

install: $(STAMP)

# The main job: train the default MoE LM on the embedded stdlib corpus (built
# on first use) on CPU; rerunning resumes from workdirs/lm_stdlib.
run: $(STAMP)
	$(PY) -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=workdirs/lm_stdlib

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
