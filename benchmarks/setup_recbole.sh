#!/usr/bin/env bash
# Create the RecBole benchmark venv (separate from the project's: RecBole 1.2.1 needs numpy<2).
#
#   bash benchmarks/setup_recbole.sh [VENV_DIR]      (default .venv-recbole)
#
# The pins are the combination known to work:
# ray needs pkg_resources (setuptools<81); RecBole uses NumPy aliases that NumPy 2 removed;
# pandas 3 fails with numpy<2 and silently changes a fillna. Run-time shims (torch.load's
# weights_only default, anomaly detection off) live in benchmarks/recbole_run.py, never in the package.
set -euo pipefail
VENV="${1:-.venv-recbole}"
PY="${PYTHON:-python3.11}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# A venv that ignores itself, so `git add -A` never picks it up.
echo '*' > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 recbole==1.2.1 "numpy<2" "setuptools<81" "pandas<3" psutil
"$VENV/bin/python" - <<'PY'
import recbole, torch, numpy
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
PY
