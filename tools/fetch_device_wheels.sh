#!/usr/bin/env bash
# Download the wheels the offline device check installs (tools/device_check.sh) into a folder that
# git ignores: simplejpeg, webdataset and braceexpand, for CPython 3.11 and 3.12 on manylinux x86_64
# (the device machine's python3 has torch but not these; it has numpy and pyyaml, their other needs).
#
#   bash tools/fetch_device_wheels.sh [DIR]     # DIR defaults to .device-wheels in the repository root
#
# Versions are pinned (override with SIMPLEJPEG=, WEBDATASET=, BRACEEXPAND=); PYTHON_VERSIONS="3.11 3.12"
# picks the interpreters. The device check installs with --find-links, so pip takes the wheel that fits.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.device-wheels}"
python="${PYTHON:-python3}"
pins=("simplejpeg==${SIMPLEJPEG:-1.9.0}" "webdataset==${WEBDATASET:-1.0.2}" "braceexpand==${BRACEEXPAND:-0.1.7}")

mkdir -p "$dest"
for version in ${PYTHON_VERSIONS:-3.11 3.12}; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "$version" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --dest "$dest" "${pins[@]}"
done
ls -1 "$dest"
