#!/usr/bin/env bash
# Prepares this checkout to run dicomflow (and, with --test, its test suite) on a fresh
# Debian/Ubuntu machine: the Debian packages it lacks, then a virtual environment in
# .venv with the locked Python dependencies (requirements.lock; --test adds
# requirements-test.lock). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

need_apt=()
if (( want_test )); then
  # DCMTK is the real DICOM peer of the tests (storescu, dcmcjpeg, dcmcrle, dcmconv).
  command -v /usr/bin/storescu >/dev/null || need_apt+=(dcmtk)
  # npm installs Azurite, the Azure Blob emulator of the backend tests (below).
  command -v npm >/dev/null || need_apt+=(nodejs npm)
  # Orthanc is the real remote PACS of the scu-gateway tests and the benchmarks.
  command -v /usr/sbin/Orthanc >/dev/null || need_apt+=(orthanc)
  # Prometheus scrapes a real run and answers every query of the Grafana dashboard.
  command -v /usr/bin/prometheus >/dev/null || need_apt+=(prometheus)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if (( ${#need_apt[@]} )); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "bootstrap: installing Debian packages: ${need_apt[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"dicomflow needs Python 3.11 or newer; python3 is {sys.version.split()[0]}")
PY

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=".venv/.dicomflow-installed"
# The runtime lock always; the test lock (test tools, linters) only with --test.
inputs="$(cat requirements.lock requirements-test.lock pyproject.toml | sha256sum | cut -c1-16)-$want_test"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$inputs" ]]; then
  echo "bootstrap: installing Python dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  lock=requirements.lock
  if (( want_test )); then
    lock=requirements-test.lock  # it includes requirements.lock
  fi
  .venv/bin/python -m pip install -q -r "$lock"
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$inputs" > "$stamp"
fi

# Azurite (Azure Blob emulator) for the backend tests, into .tools/ of this checkout.
azurite_version="3.35.0"
if (( want_test )) && ! grep -qs "\"version\": \"$azurite_version\"" .tools/node_modules/azurite/package.json; then
  echo "bootstrap: installing azurite $azurite_version into .tools" >&2
  npm install --prefix .tools --no-audit --no-fund --loglevel=error "azurite@$azurite_version" >/dev/null
fi

# s3rver (an S3 server keeping objects on disk) for the fault suite's S3 restarts.
s3rver_version="3.7.1"
if (( want_test )) && ! grep -qs "\"version\": \"$s3rver_version\"" .tools/node_modules/s3rver/package.json; then
  echo "bootstrap: installing s3rver $s3rver_version into .tools" >&2
  npm install --prefix .tools --no-audit --no-fund --loglevel=error "s3rver@$s3rver_version" >/dev/null
fi
