"""The IAM guarantees template.yaml must keep, checked on the SAM-expanded
template (moto evaluates no IAM, so this is where they are tested).

Every statement that lets a function create, attach, detach, snapshot,
terminate, delete, tag or command a resource names it by this stack's tag,
or by its owner's opt-in tag; a resource of `*` must satisfy the rule of
every resource type. Optional statements (Fn::If) are checked in both forms.

Usage: python tools/check_policies.py .flotilla/template.sam.json
"""

import json
import sys

STACK = {"Ref": "AWS::StackName"}
TYPES = ["instance", "volume", "snapshot", "launch-template", "image", "subnet", "security-group",
         "network-interface", "spot-instances-request", "document"]

# (action, resource type) -> the conditions one of which must hold:
# each a dict of condition key -> required value.
OWN = {"aws:ResourceTag/flotilla:stack": STACK}
OPTED_IN = {"aws:ResourceTag/flotilla:allow": STACK}
RULES = {
    ("ec2:RunInstances", "instance"): [{"aws:RequestTag/flotilla:stack": STACK, "ec2:MetadataHttpTokens": "required"}],
    ("ec2:RunInstances", "volume"): [{"aws:RequestTag/flotilla:stack": STACK, "ec2:Encrypted": "true"}],
    ("ec2:RunInstances", "launch-template"): [OPTED_IN],
    ("ec2:CreateVolume", "volume"): [{"aws:RequestTag/flotilla:stack": STACK, "ec2:Encrypted": "true"}],
    ("ec2:CreateVolume", "snapshot"): [OWN, OPTED_IN],
    ("ec2:AttachVolume", "instance"): [OWN],
    ("ec2:AttachVolume", "volume"): [OWN, OPTED_IN],
    ("ec2:DetachVolume", "instance"): [OWN],
    ("ec2:DetachVolume", "volume"): [OWN, OPTED_IN],
    ("ec2:CreateSnapshot", "volume"): [OWN, OPTED_IN],
    ("ec2:CreateSnapshot", "snapshot"): [{"aws:RequestTag/flotilla:stack": STACK}],
    ("ssm:SendCommand", "instance"): [{"ssm:resourceTag/flotilla:stack": STACK}],
}
for action in ("ec2:TerminateInstances", "ec2:DeleteVolume", "ec2:DeleteSnapshot"):
    for kind in ("instance", "volume", "snapshot"):
        RULES[(action, kind)] = [OWN]
for kind in ("instance", "volume", "snapshot"):
    # Tags only as part of a create call, or only the reaper's mark on this stack's.
    RULES[("ec2:CreateTags", kind)] = [{"ec2:CreateAction": None}, {**OWN, "aws:TagKeys": None}]


def expand(statement):
    """A statement, or both forms of an optional one."""
    if isinstance(statement, dict) and "Fn::If" in statement:
        for branch in statement["Fn::If"][1:]:
            if isinstance(branch, dict) and "Ref" not in branch:
                yield from expand(branch)
        return
    yield statement


def as_list(value):
    return value if isinstance(value, list) else [value]


def resource_types(statement):
    kinds = set()
    for resource in as_list(statement.get("Resource", [])):
        text = json.dumps(resource)
        if resource == "*" or text.endswith(':*"') or '"*"' == text:
            return set(TYPES)
        kinds |= {kind for kind in TYPES if f":{kind}/" in text or f"::{kind}/" in text}
    return kinds


def conditions(statement):
    found = {}
    for pairs in (statement.get("Condition") or {}).values():
        if isinstance(pairs, dict):
            found.update(pairs)
    return found


def holds(required, present):
    return all(key in present and (value is None or present[key] == value) for key, value in required.items())


def check(template):
    problems = []
    for role, resource in template["Resources"].items():
        if resource.get("Type") != "AWS::IAM::Role":
            continue
        for policy in resource["Properties"].get("Policies", []):
            for raw in policy["PolicyDocument"]["Statement"]:
                for statement in expand(raw):
                    if statement.get("Effect") != "Allow":
                        continue
                    where = f"{role} {statement.get('Sid', '')}".strip()
                    present = conditions(statement)
                    kinds = resource_types(statement)
                    for action in as_list(statement.get("Action", [])):
                        for kind in sorted(kinds):
                            options = RULES.get((action, kind))
                            if options and not any(holds(option, present) for option in options):
                                problems.append(f"{where}: {action} on {kind} without {options}")
                        if action == "iam:PassRole" and present.get("iam:PassedToService") != "ec2.amazonaws.com":
                            problems.append(f"{where}: PassRole not limited to EC2")
                        if action == "s3:PutObject" and "schedules/" in json.dumps(statement.get("Resource")):
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
    print("policy: every resource a function may create, change or command is this stack's or opted in")


if __name__ == "__main__":
    main(sys.argv[1])
