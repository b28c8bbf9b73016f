#!/usr/bin/env bash
# Rerun every benchmark (each resumes where it stopped), then regenerate the README tables
# and plots. Run from the repository root with the venv that has `.[benchmarks]` installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY benchmarks/accuracy_rt.py --threads 1
$PY benchmarks/peer_torch_pruning.py --threads 1
$PY benchmarks/accuracy_ner.py --threads 1
OMP_NUM_THREADS=1 $PY benchmarks/accuracy_lm.py --threads 1
$PY benchmarks/speed.py --threads 2
$PY benchmarks/step_cost.py --threads 1
$PY benchmarks/rewrite_speed.py
$PY examples/cli_session.py
$PY benchmarks/readme_tables.py
