"""What a subscriber to Flotilla's events heard, on the local stack: drains
the subscriber queue `make local-up` made (FLOTILLA_EVENTS_QUEUE_URL, a
rule matching source "flotilla") and checks, per job, that its job events
end in the expected status, that no `sequence` is missing, and that two
copies of one `event_id` (at-least-once delivery) say the same thing.
Exits 1 on any miss.

    .venv/bin/python tools/events_check.py smoke-ok=SUCCEEDED smoke-fail=FAILED ...
"""

import json
import os
import sys
import time

import boto3


def drain(sqs, url, seconds):
    """Everything the queue holds, waiting up to `seconds` for stragglers."""
    events, quiet_since = [], time.time()
    while time.time() - quiet_since < seconds:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        for message in got:
            events.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        if got:
            quiet_since = time.time()
    return events


def main(expected):
    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION", "us-east-1"))
    sqs = session.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    events = drain(sqs, os.environ["FLOTILLA_EVENTS_QUEUE_URL"], 5)
    failures = 0
    for job_id, status in expected.items():
        mine = [e for e in events if e.get("source") == "flotilla" and e["detail"].get("jobId") == job_id]
        by_id = {}
        for event in mine:
            by_id.setdefault(event["detail"]["event_id"], []).append(event["detail"])
        sequences = sorted(copies[0]["sequence"] for copies in by_id.values())
        ends = [copies[0] for copies in by_id.values() if copies[0].get("shard") is None]
        ends.sort(key=lambda d: d["sequence"])
        last = ends[-1]["status"] if ends else None
        problems = []
        if last != status:
            problems.append(f"last job status {last}, wanted {status}")
        if sequences != list(range(1, len(sequences) + 1)):
            problems.append(f"sequences {sequences} have a gap")
        if any(any(c != copies[0] for c in copies) for copies in by_id.values()):
            problems.append("two copies of one event_id differ")
        word = "FAIL" if problems else "ok  "
        print(f"{word} events of {job_id}: {len(by_id)} distinct ({len(mine)} delivered), "
              f"job statuses {[e['status'] for e in ends]}" + (f": {'; '.join(problems)}" if problems else ""))
        failures += bool(problems)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(dict(arg.split("=", 1) for arg in sys.argv[1:])))
