"""The demo's last act: restore one shard's snapshot into a fresh volume,
on a fresh instance, and check that its bytes are the ones the run wrote.

Reads the run's own `sha256sum items.txt` line from the job's output in S3,
submits a one-instance job whose volume is restored from shard 0's snapshot
(its mount script must not format it), and prints both checksums.

    .venv/bin/python tools/demo_restore.py <job id>    (after `source .flotilla/local.env`)
"""

import json
import os
import re
import subprocess
import sys

import boto3

SHA = re.compile(r"^([0-9a-f]{64})  items\.txt$", re.M)


def output(s3, job_id, shard, attempt, phase):
    key = f"jobs/{job_id}/output/{shard}/{attempt}-{phase}.txt"
    return s3.get_object(Bucket=os.environ["FLOTILLA_BUCKET"], Key=key)["Body"].read().decode()


def main():
    job_id = sys.argv[1]
    ec2, s3 = boto3.client("ec2"), boto3.client("s3")
    snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:flotilla:job-id", "Values": [job_id]}, {"Name": "tag:flotilla:shard", "Values": ["0"]}])
    if not snapshots["Snapshots"]:
        raise SystemExit(f"demo: no snapshot of {job_id} shard 0")
    snapshot = snapshots["Snapshots"][0]["SnapshotId"]
    # Every shard's mount and unmount ran on a real device.
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=os.environ["FLOTILLA_BUCKET"], Prefix=f"jobs/{job_id}/output/") for o in page.get("Contents", [])]
    for key in sorted(k for k in keys if k.endswith(("-mount.txt", "-unmount.txt"))):
        body = s3.get_object(Bucket=os.environ["FLOTILLA_BUCKET"], Key=key)["Body"].read().decode()
        if "skipped" in body or not re.search(r"^(mounted|unmounted) ", body, re.M):
            raise SystemExit(f"demo: {key} did not run on a device:\n{body}")
        print(f"{key.split('/output/')[1]}: {body.strip().splitlines()[-1]}")
    # The owner of a snapshot opts it in for a deployment: intake checks this tag.
    ec2.create_tags(Resources=[snapshot], Tags=[{"Key": "flotilla:allow", "Value": os.environ["FLOTILLA_STACK"]}])
    wrote = SHA.search(output(s3, job_id, 0, 1, "run"))
    verify_id = f"{job_id}-restore"
    spec = {
        "id": verify_id,
        "fleet": {"count": 1},
        "instance_types": ["t3.micro"],
        "image": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "volumes": [{"name": "data", "source": {"snapshot_id": snapshot}, "device": "/dev/sdf",
                     "mount_point": "/data", "snapshot": "never"}],
        "run": {"script": "cd \"$FLOTILLA_MOUNT_DATA/results\" && sha256sum items.txt", "timeout_seconds": 60},
        "deadline_minutes": 10,
    }
    path = os.path.join(".flotilla", "demo-restore-job.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)
    print(f"restoring {snapshot} (shard 0 of {job_id}) into a fresh volume: job {verify_id}")
    subprocess.run(["flotilla", "submit", path], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["flotilla", "watch", verify_id, "--timeout", "300"], check=True)
    mount = output(s3, verify_id, 0, 1, "mount")
    read = SHA.search(output(s3, verify_id, 0, 1, "run"))
    print()
    print(f"sha256 of results/items.txt as the run wrote it:  {wrote.group(1) if wrote else '(not found)'}")
    print(f"sha256 of results/items.txt restored from {snapshot}: {read.group(1) if read else '(not found)'}")
    if not (wrote and read and wrote.group(1) == read.group(1)):
        raise SystemExit("demo: the restored bytes differ")
    if "skipped" in mount:
        raise SystemExit("demo: the mount was skipped")
    print("ok   the restored volume holds the bytes the job wrote (mounted, not formatted)")


if __name__ == "__main__":
    main()
