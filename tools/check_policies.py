"""The IAM guarantees template.yaml must keep, checked on the SAM-expanded
template (moto evaluates no IAM, so this is where they are tested).

Every statement that lets a function touch a volume, snapshot or instance
names it by this stack's tag or by its owner's opt-in tag; nothing else.

Usage: python tools/check_policies.py .flotilla/template.sam.json
"""

import json
import sys

STACK = {"Ref": "AWS::StackName"}


def statements(template, role):
    for policy in template["Resources"][role]["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            if isinstance(statement, dict) and "Fn::If" in statement:
                continue  # optional statements (other accounts' output)
            yield statement


def as_list(value):
    return value if isinstance(value, list) else [value]


def resources(statement):
    text = json.dumps(statement.get("Resource"))
    return text


def conditions(statement):
    found = {}
    for operator, pairs in (statement.get("Condition") or {}).items():
        if isinstance(pairs, dict):
            for key, value in pairs.items():
                found[key] = value
    return found


def check(template):
    problems = []
    scoped = {"aws:ResourceTag/flotilla:stack", "aws:ResourceTag/flotilla:allow"}
    for role in ("ReconcileFunctionRole", "TickFunctionRole", "IntakeFunctionRole"):
        for statement in statements(template, role):
            actions = as_list(statement["Action"])
            where = f"{role} {statement.get('Sid', actions)}"
            keys = conditions(statement)
            on = resources(statement)
            for action in actions:
                if action in ("ec2:AttachVolume", "ec2:DetachVolume") and "volume/" in on:
                    if not scoped & keys.keys() or any(keys[k] != STACK for k in scoped & keys.keys()):
                        problems.append(f"{where}: {action} on volumes without the stack or opt-in tag")
                if action == "ec2:CreateVolume" and "snapshot/" in on:
                    if not scoped & keys.keys():
                        problems.append(f"{where}: restore from snapshots without the stack or opt-in tag")
                if action == "ec2:CreateVolume" and "volume/" in on:
                    if keys.get("aws:RequestTag/flotilla:stack") != STACK or keys.get("ec2:Encrypted") != "true":
                        problems.append(f"{where}: CreateVolume without the stack tag and encryption")
                if action == "ec2:RunInstances" and "instance/" in on:
                    if keys.get("aws:RequestTag/flotilla:stack") != STACK or keys.get("ec2:MetadataHttpTokens") != "required":
                        problems.append(f"{where}: RunInstances without the stack tag and IMDSv2")
                if action == "ec2:RunInstances" and "launch-template/" in on:
                    if keys.get("aws:ResourceTag/flotilla:allow") != STACK:
                        problems.append(f"{where}: launch templates without the opt-in tag")
                if action in ("ec2:TerminateInstances", "ec2:DeleteVolume", "ec2:DeleteSnapshot", "ec2:CreateTags"):
                    if action != "ec2:CreateTags" and keys.get("aws:ResourceTag/flotilla:stack") != STACK:
                        problems.append(f"{where}: {action} beyond this stack's resources")
                if action == "ssm:SendCommand" and "instance/" in on:
                    if keys.get("ssm:resourceTag/flotilla:stack") != STACK:
                        problems.append(f"{where}: SendCommand beyond this stack's instances")
                if action == "iam:PassRole" and keys.get("iam:PassedToService") != "ec2.amazonaws.com":
                    problems.append(f"{where}: PassRole not limited to EC2")
                if action.startswith("s3:PutObject") and "schedules/" in on:
                    problems.append(f"{where}: may write schedules/")
    return problems


def main(path):
    with open(path) as f:
        template = json.load(f)
    problems = check(template)
    for problem in problems:
        print(f"policy: {problem}")
    if problems:
        sys.exit(1)
    print("policy: every volume, snapshot and instance a function may touch is scoped to the stack or opted in")


if __name__ == "__main__":
    main(sys.argv[1])
