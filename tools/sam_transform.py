"""Expand template.yaml's SAM transform offline, so checkov sees the
functions' generated roles and their inline policies.

Usage: python tools/sam_transform.py template.yaml out.json
"""

import json
import os
import sys

import yaml
from samtranslator.translator.transform import transform


class _Loader(yaml.SafeLoader):
    pass


def _intrinsic(name):
    def construct(loader, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if name == "Fn::GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {"Ref": value} if name == "Ref" else {name: value}

    return construct


for tag in ["Ref", "Sub", "GetAtt", "If", "Not", "Equals", "And", "Or", "Join", "Split", "Select",
            "FindInMap", "GetAZs", "ImportValue", "Base64", "Cidr", "Condition"]:
    full = tag if tag in ("Ref", "Condition") else f"Fn::{tag}"
    _Loader.add_constructor(f"!{tag}", _intrinsic(full))


class _NoManagedPolicies:
    """The functions name no managed policies by name; nothing to look up."""

    def load(self):
        return {}


def main(source, target):
    # The translator only needs a Region name to fill pseudo parameters.
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with open(source) as f:
        template = yaml.load(f, Loader=_Loader)
    # As `sam package` would: local code becomes an S3 location.
    for name, resource in template.get("Resources", {}).items():
        properties = resource.get("Properties", {})
        if resource.get("Type") == "AWS::Serverless::Function" and not str(properties.get("CodeUri", "")).startswith("s3://"):
            properties["CodeUri"] = f"s3://packaged-code/{name}.zip"
    expanded = transform(template, {}, _NoManagedPolicies())
    with open(target, "w") as f:
        json.dump(expanded, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
