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
echo "== restore shard 0's snapshot and read its bytes back"
if [ "$status" = 0 ]; then
  $PY tools/demo_restore.py "$job_id" || status=$?
fi
exit $status
