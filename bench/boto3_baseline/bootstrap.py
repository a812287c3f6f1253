"""Baseline for `make bench` only, never deployed: the functions' start-up
written with Python and boto3, then a minimal Lambda Runtime API loop.

It builds what shared/src/aws/mod.rs `ports()` builds at start-up: one
session, then EC2, SSM, S3 (path-style behind an endpoint) and SQS clients
with adaptive retry, 5 attempts. STS is only built on demand there (an
AssumeRole per job role), so it is not built here either.
"""

import json
import os
import urllib.request

import boto3
from botocore.config import Config

endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
config = Config(retries={"mode": "adaptive", "max_attempts": 5})
session = boto3.Session(region_name=os.environ["AWS_REGION"])
clients = {
    name: session.client(
        name,
        endpoint_url=endpoint,
        config=config.merge(Config(s3={"addressing_style": "path"})) if name == "s3" and endpoint else config,
    )
    for name in ("ec2", "ssm", "s3", "sqs")
}

api = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime/invocation"
reply = json.dumps({"batchItemFailures": []}).encode()
while True:
    with urllib.request.urlopen(f"{api}/next") as next_event:
        request_id = next_event.headers["Lambda-Runtime-Aws-Request-Id"]
        json.load(next_event)
    post = urllib.request.Request(f"{api}/{request_id}/response", data=reply, method="POST")
    urllib.request.urlopen(post).close()
