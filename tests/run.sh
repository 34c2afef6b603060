#!/usr/bin/env bash
# The test command: installs the peer tools and the package, then runs pytest.
#   bash tests/run.sh [pytest args...]      (default: the whole suite)
# As root on Debian 12 it installs the Debian peers (docker, podman, skopeo,
# CNCF Distribution, umoci, runc/crun, wrk, busybox-static, Ceph's S3
# gateway, ...) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  docker.io podman skopeo umoci runc crun docker-registry wrk busybox-static
  debootstrap zstd pigz uidmap fuse-overlayfs slirp4netns iptables
  containernetworking-plugins ca-certificates git file curl python3-venv
  apache2-utils
  ceph-mon ceph-osd radosgw ceph-common
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

# The package and its test dependencies go into a virtual environment of
# the checkout's own (reused when present), never into the system's or a
# user's Python: the `dockyard` a user installed stays what it was.
BASE_PYTHON=${PYTHON:-python3}
VENV=${DOCKYARD_TEST_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  if ! "$BASE_PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 keeps venv (ensurepip) in a package of its own
    rm -rf "$VENV"
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv </dev/null
    fi
    "$BASE_PYTHON" -m venv "$VENV"
  fi
fi
PYTHON="$VENV/bin/python"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'

set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "${@:-tests}"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "tests/run.sh: pytest collected no tests" >&2
  exit 1
fi
exit $status
