"""How soon a job's work moved on, on the local stack. Prints each figure;
exits 1 if one is above --fail-above seconds (a poll would take 20 s).

- fleet ready -> first command: the first SendCommand's RequestedDateTime
  minus the moment the last instance's agent came Online (the emulator
  brings an agent Online FLOTILLA_EMU_AGENT_SECONDS after its LaunchTime);
- phase -> next phase: for each instance, the next phase's SendCommand
  minus the end of the previous phase on the last of its instances to end
  it; this is what the Run Command status events buy over polling. The
  first instance to end may also wait the reconciler's hold for peers
  (COALESCE_SECONDS), and no longer.

    .venv/bin/python tools/fast_path.py <job id> [--most 2] [--fail-above 5] [--phases-only]
"""

import argparse
import datetime
import os

import boto3

# shared/src/reconcile/decide/timing.rs: how long a phase waits for peers.
COALESCE_SECONDS = 3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job_id")
    parser.add_argument("--most", type=float, default=2.0, help="the goal, printed beside each figure")
    parser.add_argument("--fail-above", type=float, default=5.0,
                        help="exit 1 past this: the local poll delay is 20 s, so a figure past 5 s means a phase "
                             "waited for a poll, while one between the goal and 5 s is the local stack being "
                             "slow on a busy 2-core machine (seen up to 2.7 s)")
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
                (first["RequestedDateTime"] - ready).total_seconds(), args.most)]
    # instance -> [(requested, ended, phase)] in order
    per_instance = {}
    for command in commands:
        for instance_id in command["InstanceIds"]:
            invocation = ssm.get_command_invocation(CommandId=command["CommandId"], InstanceId=instance_id)
            ended = invocation.get("ExecutionEndDateTime")
            per_instance.setdefault(instance_id, []).append(
                (command["RequestedDateTime"], datetime.datetime.fromisoformat(ended) if ended else None, command["Comment"].split()[2]))
    # The reconciler holds a phase up to COALESCE_SECONDS for peers still in
    # the one before, so that one SendCommand carries them all: a command is
    # late if it went out more than --most after the LAST of its instances
    # ended the previous phase; the first of them may wait the hold as well.
    batch_gaps, held = {}, {}
    for command in commands:
        phase = command["Comment"].split()[2]
        previous_ends = []
        for instance_id in command["InstanceIds"]:
            runs = per_instance[instance_id]
            at = next(i for i, run in enumerate(runs) if run[0] == command["RequestedDateTime"] and run[2] == phase)
            if at > 0 and runs[at - 1][1] is not None:
                previous_ends.append((runs[at - 1][2], runs[at - 1][1]))
        if previous_ends:
            key = f"{previous_ends[0][0]} -> {phase}"
            requested = command["RequestedDateTime"]
            batch_gaps[key] = max(batch_gaps.get(key, 0.0), (requested - max(e for _, e in previous_ends)).total_seconds())
            held[key] = max(held.get(key, 0.0), (requested - min(e for _, e in previous_ends)).total_seconds())
    figures += [(f"{key}: next phase sent after the last instance of its command ended the previous", gap, args.most)
                for key, gap in batch_gaps.items()]
    figures += [(f"{key}: the first instance to end waited, the {COALESCE_SECONDS} s hold for peers included",
                 held[key], args.most + COALESCE_SECONDS) for key in held]
    late = False
    for what, figure, goal in figures:
        above = "" if figure <= goal else ", above the goal"
        print(f"{args.job_id}: {what}: {figure:.2f} s (goal <= {goal:g} s{above})")
        late = late or figure > goal - args.most + args.fail_above
    if late or any(figure > goal for _, figure, goal in figures):  # the timeline, to see where the time went
        for instance_id, runs in per_instance.items():
            for requested, ended, phase in runs:
                print(f"  {instance_id} {phase}: sent {requested:%H:%M:%S.%f}, ended {ended:%H:%M:%S.%f}" if ended
                      else f"  {instance_id} {phase}: sent {requested:%H:%M:%S.%f}, not ended")
    raise SystemExit(1 if late else 0)


if __name__ == "__main__":
    main()
