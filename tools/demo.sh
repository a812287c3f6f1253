#!/usr/bin/env bash
# The demo: local stack up, submit events/demo-job.json, follow it to the end,
# show what is left in the emulator, stack down. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

trap '$PY tools/local_stack.py down' EXIT
$PY tools/local_stack.py up
source .flotilla/local.env

echo
echo "== plan"
flotilla plan events/demo-job.json
echo
echo "== submit"
job_id=$(flotilla submit events/demo-job.json)
echo "submitted $job_id"
echo
echo "== watch"
status=0
flotilla watch "$job_id" --timeout 600 || status=$?
echo
echo "== what is left in the emulator"
$PY tools/inventory.py "$job_id"
echo
echo "note: the emulator has no block devices, so mkfs/mount/umount were not"
echo "      really run (see the mount and unmount output above); every other"
echo "      step went through the real AWS SDK to moto, and the setup/run"
echo "      scripts really ran, in a scratch directory per instance under"
echo "      .flotilla/instances/."
exit $status
