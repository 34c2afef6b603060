#!/usr/bin/env bash
# The test command: installs the peer tools and the package, then runs pytest.
#   bash tests/run.sh [pytest args...]      (default: the whole suite)
# As root on Debian 12 it installs the Debian peers (docker, podman, skopeo,
# CNCF Distribution, umoci, runc/crun, wrk, busybox-static, ...) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  docker.io podman skopeo umoci runc crun docker-registry wrk busybox-static
  debootstrap zstd pigz uidmap fuse-overlayfs slirp4netns iptables
  containernetworking-plugins ca-certificates git file curl
)

missing_packages() {
  local pkg
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
      echo "$pkg"
    fi
  done
}

if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  mapfile -t missing < <(missing_packages)
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "tests/run.sh: missing Debian packages (need root to install): ${missing[*]}" >&2
    else
      echo "tests/run.sh: installing ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -q
      apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    fi
  fi
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip python3-venv </dev/null
  fi
fi
pip_args=(-q --disable-pip-version-check --root-user-action=ignore)
# Debian's own python refuses pip into the system site without this (PEP 668)
if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  pip_args+=(--break-system-packages)
fi
"$PYTHON" -m pip install "${pip_args[@]}" -e '.[test]'

set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "${@:-tests}"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "tests/run.sh: pytest collected no tests" >&2
  exit 1
fi
exit $status
