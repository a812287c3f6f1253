"""How soon a job's work moved on, on the local stack. Prints each figure;
exits 1 if one is above --most seconds.

- fleet ready -> first command: the first SendCommand's RequestedDateTime
  minus the moment the last instance's agent came Online (the emulator
  brings an agent Online FLOTILLA_EMU_AGENT_SECONDS after its LaunchTime);
- phase -> next phase: for each instance, the next phase's SendCommand
  minus the end of the previous phase's invocation (the slowest instance);
  this is what the Run Command status events buy over polling.

    .venv/bin/python tools/fast_path.py <job id> [--most 2] [--phases-only]
"""

import argparse
import datetime
import os

import boto3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job_id")
    parser.add_argument("--most", type=float, default=2.0)
    parser.add_argument("--phases-only", action="store_true",
                        help="skip the first figure (a job with volumes first waits for them to attach)")
    args = parser.parse_args()
    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION", "us-east-1"))
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    ec2 = session.client("ec2", endpoint_url=endpoint)
    ssm = session.client("ssm", endpoint_url=endpoint)
    agent_seconds = float(os.environ.get("FLOTILLA_EMU_AGENT_SECONDS", "2"))
    launched = [
        instance["LaunchTime"]
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:flotilla:job-id", "Values": [args.job_id]}]
        )
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]
    ready = max(launched) + datetime.timedelta(seconds=agent_seconds)
    commands = sorted(
        (command for page in ssm.get_paginator("list_commands").paginate() for command in page["Commands"]
         if command.get("Comment", "").startswith(f"flotilla {args.job_id} ")),
        key=lambda c: c["RequestedDateTime"],
    )
    first = commands[0]
    figures = [] if args.phases_only else [(f"first command ({first['Comment'].split()[2]}) sent after the last agent came Online",
                (first["RequestedDateTime"] - ready).total_seconds())]
    # instance -> [(requested, ended, phase)] in order
    per_instance = {}
    for command in commands:
        for instance_id in command["InstanceIds"]:
            invocation = ssm.get_command_invocation(CommandId=command["CommandId"], InstanceId=instance_id)
            ended = invocation.get("ExecutionEndDateTime")
            per_instance.setdefault(instance_id, []).append(
                (command["RequestedDateTime"], datetime.datetime.fromisoformat(ended) if ended else None, command["Comment"].split()[2]))
    gaps = {}
    for runs in per_instance.values():
        for (_, ended, phase), (requested, _, next_phase) in zip(runs, runs[1:]):
            if ended is not None:
                key = f"{phase} -> {next_phase}"
                gaps[key] = max(gaps.get(key, 0.0), (requested - ended).total_seconds())
    figures += [(f"{key}: next phase sent after the previous ended (slowest instance)", gap) for key, gap in gaps.items()]
    late = False
    for what, figure in figures:
        print(f"{args.job_id}: {what}: {figure:.2f} s (goal <= {args.most:g} s)")
        late = late or figure > args.most
    raise SystemExit(1 if late else 0)


if __name__ == "__main__":
    main()
