#!/usr/bin/env bash
# Set up .venv (once, and again when a requirements file changes), then run:
#   bash bootstrap.sh demo     train the demo LoRA on the tiny built-in model
#   bash bootstrap.sh test     run the test suite
#   bash bootstrap.sh ARGS...  python -m trainer ARGS...
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
stamp="$VENV/.traintrain-installed"
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and pinned: a requirement that asks for torch later then finds it and pulls
  # no multi-GB CUDA build.
  pip install torch==2.13.0
  pip install -r requirements.txt -r requirements-dev.txt
  # Only for its CLIP vocabulary file (read as data); --no-deps keeps torchvision out, which
  # would break peft and diffusers' load_lora_weights beside this torch.
  pip install --no-deps open-clip-torch
  echo "$want" > "$stamp"
fi
case "${1:-}" in
  demo) shift; exec "$VENV/bin/python" -m trainer demo "$@" ;;
  test) shift; exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  "") echo "usage: bash bootstrap.sh demo|test|ARGS for python -m trainer" >&2; exit 2 ;;
  *) exec "$VENV/bin/python" -m trainer "$@" ;;
esac
