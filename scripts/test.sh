#!/usr/bin/env bash
# Runs the whole test suite (as root): installs what is missing, lints, then pytest — unit tests, real-kernel
# scenario tests in network namespaces, and the IPVS suite inside a qemu VM. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest -q "$@"
