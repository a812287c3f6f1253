"""Print what a job left in the local emulator: instances, volumes, snapshots.

Exits 1 if any Flotilla-managed instance is still running.
"""

import os
import sys

import boto3

job_id = sys.argv[1] if len(sys.argv) > 1 else None
ec2 = boto3.client("ec2", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ.get("AWS_REGION", "us-east-1"))
managed = [{"Name": "tag:flotilla:managed-by", "Values": ["flotilla"]}]
if job_id:
    managed.append({"Name": "tag:flotilla:job-id", "Values": [job_id]})
states = {}
for reservation in ec2.describe_instances(Filters=managed)["Reservations"]:
    for instance in reservation["Instances"]:
        states.setdefault(instance["State"]["Name"], []).append(instance["InstanceId"])
for state, ids in sorted(states.items()):
    print(f"instances {state}: {len(ids)} ({', '.join(ids)})")
volumes = ec2.describe_volumes(Filters=managed)["Volumes"]
print(f"job data volumes left: {len(volumes)}")
for snapshot in ec2.describe_snapshots(OwnerIds=["self"], Filters=managed)["Snapshots"]:
    print(f"snapshot {snapshot['SnapshotId']} of {snapshot['VolumeId']}: {snapshot['Description']}")
running = len(states.get("running", [])) + len(states.get("pending", []))
print(f"managed instances still running: {running}")
sys.exit(1 if running else 0)
