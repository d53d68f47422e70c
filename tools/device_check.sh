#!/usr/bin/env bash
# The one prepared device check, for a short window on a bare, offline machine with one GPU:
#   1. install lresnet offline (editable, no dependencies, no index), and from the wheels folder
#      whichever of simplejpeg, webdataset, braceexpand python3 lacks;
#   2-5. lresnet bench device: the CUDA-marked tests, bench model (fp32 vs bf16 channels_last vs
#      + torch.compile, with MFU), bench train from shards made here (CPU decode vs nvjpeg), then a
#      short table; the full JSON goes to $OUT/device_check.json, the whole output to $OUT/device_check.log.
#
#   bash tools/device_check.sh                        # on the GPU machine: at most 8 minutes
#   bash tools/device_check.sh --device cpu --quick   # anywhere, under a minute: proves the check first
#
# Arguments go to `lresnet bench device` (--stage, --batch-size, --deadline, ...; see its --help).
# Environment: PYTHON (python3), WHEELS (the wheels folder, .device-wheels: tools/fetch_device_wheels.sh
# fills it), WORK (scratch, /tmp/lresnet-device-check), INSTALL_BUDGET (seconds, 120), OUT.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="${WHEELS:-$root/.device-wheels}"
work="${WORK:-/tmp/lresnet-device-check}"
budget="${INSTALL_BUDGET:-120}"
mkdir -p "$work" || exit 1
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && exec > >(tee "$OUT/device_check.log") 2>&1
fi

# 1. install, within its budget; what happened goes into the report as the first unit
log="$work/install.log"
: > "$log"
start=$(date +%s)
status=ok
missing=$("$python" -c 'import importlib.util as u
print(" ".join(n for n in ("simplejpeg", "webdataset", "braceexpand") if u.find_spec(n) is None))' 2>>"$log")
if [ -z "$missing" ]; then
    detail="simplejpeg, webdataset, braceexpand present"
elif timeout "$budget" "$python" -m pip install --no-index --no-deps --find-links "$wheels" $missing >>"$log" 2>&1; then
    detail="installed $missing from $wheels"
else
    status=failed
    detail="could not install $missing from $wheels (fill it with tools/fetch_device_wheels.sh and carry it)"
fi
installed_at=$("$python" -c 'import os, lresnet.train as t
print(os.path.dirname(os.path.dirname(os.path.realpath(t.__file__))))' 2>/dev/null)
if [ "$installed_at" = "$root" ]; then
    detail="$detail; lresnet already installed from $root"
elif timeout "$budget" "$python" -m pip install --no-deps --no-build-isolation --no-index -e "$root" >>"$log" 2>&1; then
    detail="$detail; lresnet installed (editable)"
else
    status=failed
    detail="$detail; pip install -e failed"
fi
seconds=$(( $(date +%s) - start ))
echo "device check: install: $status in $seconds s: $detail" >&2
if ! "$python" -c 'import lresnet.tools.cli' >>"$log" 2>&1; then
    echo "device check: lresnet does not import, nothing else can run; the install log ends:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi

# 2-5. everything else, each unit within its own budget
exec "$python" -m lresnet.tools bench device --work "$work" --install-status "$status" \
    --install-seconds "$seconds" --install-detail "$detail" --install-log "$log" "$@"
