#!/usr/bin/env bash
# Print the path of a CPython 3.10 interpreter, or explain what to install.
# Detectron2's registry wheel (sal-detectron2) is built for CPython 3.10 only.
set -u
candidates=("${PYTHON310:-}" python3.10)
if command -v pyenv >/dev/null 2>&1; then
  for p in "$(pyenv root)"/versions/3.10.*/bin/python3.10; do candidates+=("$p"); done
fi
for p in /usr/bin/python3.10 /usr/local/bin/python3.10 python3; do candidates+=("$p"); done
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  exe=$(command -v "$c" 2>/dev/null) || continue
  if "$exe" -c 'import sys, venv; sys.exit(0 if sys.version_info[:2] == (3, 10) else 1)' >/dev/null 2>&1; then
    echo "$exe"; exit 0
  fi
done
echo "ERROR: no CPython 3.10 found. vipa_d2's pinned Detectron2 build (sal-detectron2 0.7.2," >&2
echo "torch 2.3.1) needs CPython 3.10. Install it (e.g. 'pyenv install 3.10', or your" >&2
echo "distribution's python3.10 + python3.10-venv) or point PYTHON310=/path/to/python3.10." >&2
exit 1
