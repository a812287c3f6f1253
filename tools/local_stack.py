"""The local stack: moto server (with Flotilla's extension), the bucket and
queues template.yaml declares, `cargo lambda watch` serving the real function
binaries, and an event pump between them.

  python tools/local_stack.py up        # start everything, write .flotilla/local.env
  python tools/local_stack.py down      # stop what `up` started, by pid
  python tools/local_stack.py fire RULE # fire a schedule now (cron or rate)
  python tools/local_stack.py next-fires 'cron(...)' ZONE AFTER COUNT  # when Scheduler fires it
  python tools/local_stack.py pump      # the pump itself (started by `up`)
  python tools/local_stack.py interrupt INSTANCE  # spot interruption warning, then reclaim
  python tools/local_stack.py kill INSTANCE       # EC2 TerminateInstances
  python tools/local_stack.py stop INSTANCE       # EC2 StopInstances
  python tools/local_stack.py impair INSTANCE     # its status checks fail (moto extension gap 14)

The pump delivers queue messages to the functions as real SQS event batches
through cargo lambda's invoke endpoint, up to FLOTILLA_LOCAL_CONCURRENCY
(default 3) batches of one queue at once, as Lambda's poller does. It honours partial batch failures
(only successful records are deleted), visibility timeouts, and DLQs (moto
moves a message after maxReceiveCount receives). It fires enabled `rate(...)`
schedules (the safety tick) as real EventBridge "Scheduled Event" payloads,
every FLOTILLA_LOCAL_TICK_SECONDS (default 20) at most, so a stranded job is
picked up quickly; `cron(...)` schedules fire only through `fire`.
template.yaml's AWS::Events::Rule resources are created on moto's default
bus with their SQS targets, so the EC2 state changes and Run Command status
changes the moto extension emits reach the reconcile queue as EventBridge
delivers them. `interrupt` puts an "EC2 Spot Instance Interruption Warning"
on the reconcile queue and terminates the instance
FLOTILLA_EMU_RECLAIM_SECONDS (default 120, EC2's two-minute warning) later.
"""

import concurrent.futures
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = os.path.join(ROOT, ".flotilla")
PIDS = os.path.join(STATE, "pids")
LOGS = os.path.join(STATE, "logs")
ENV_FILE = os.path.join(STATE, "local.env")
STACK = os.environ.get("FLOTILLA_STACK_NAME", "flotilla")
ACCOUNT = "123456789012"
REGION = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
MOTO_PORT = int(os.environ.get("FLOTILLA_MOTO_PORT", "5055"))
INVOKE_PORT = int(os.environ.get("FLOTILLA_INVOKE_PORT", "9055"))
ENDPOINT = f"http://127.0.0.1:{MOTO_PORT}"
# Locally, failed records come back after this many seconds rather than the
# template's visibility timeouts, so a demo does not stall on one retry.
LOCAL_VISIBILITY = int(os.environ.get("FLOTILLA_LOCAL_VISIBILITY_SECONDS", "10"))
# Locally, rate(...) schedules (the safety tick, rate(5 minutes) in the
# template) fire at least this often.
WORKER_PROFILE = "flotilla-worker"
# Batches of one queue in flight at once, and cargo lambda's instances per function.
PUMP_CONCURRENCY = int(os.environ.get("FLOTILLA_LOCAL_CONCURRENCY", "3"))
LOCAL_TICK = int(os.environ.get("FLOTILLA_LOCAL_TICK_SECONDS", "20"))
# As deployed (template.yaml's PollDelaySeconds): EC2 and SSM events, not polls, move jobs on.
POLL_DELAY = os.environ.get("FLOTILLA_POLL_DELAY_SECONDS", "20")
SAFETY_POLL = os.environ.get("FLOTILLA_SAFETY_POLL_SECONDS", "120")
VENV_BIN = os.path.dirname(sys.executable)


def log(message):
    print(f"local-stack: {message}", flush=True)


def log_timed(message):
    """A pump line, stamped so a slow hand-off can be traced in pump.log."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    sys.stdout.write(f"{stamp} local-stack: {message}\n")  # one write: pump threads share stdout
    sys.stdout.flush()


# --- template.yaml --------------------------------------------------------


def load_template():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tag(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {"Fn::" + suffix if suffix not in ("Ref",) else "Ref": value}

    Loader.add_multi_constructor("!", tag)
    with open(os.path.join(ROOT, "template.yaml")) as f:
        return yaml.load(f, Loader=Loader)


def sub(value):
    """Resolve the few !Sub forms the template uses for names."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        value = value["Fn::Sub"]
    return value.replace("${AWS::StackName}", STACK).replace("${AWS::AccountId}", ACCOUNT).replace("${AWS::Region}", REGION)


def resolve(template, value):
    """A parameter's Default for {"Ref": <parameter>}; other values unchanged."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        parameter = template.get("Parameters", {}).get(value["Ref"])
        if parameter is None or "Default" not in parameter:
            raise SystemExit(f"local-stack: template.yaml: cannot resolve {value} locally")
        return parameter["Default"]
    return value


def wiring(template):
    """Queues, bucket, and which function each queue and schedule feeds.

    Other resources (AWS::Events::Rule, AWS::SQS::QueuePolicy, IAM, ...) are
    not wired locally."""
    resources = template["Resources"]
    queues, routes, schedules = {}, [], []
    bucket = None
    for logical, resource in resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::SQS::Queue":
            redrive = props.get("RedrivePolicy")
            queues[logical] = {
                "name": sub(props["QueueName"]),
                "fifo": bool(props.get("FifoQueue")),
                "visibility": props.get("VisibilityTimeout", 30),
                "dlq": redrive["deadLetterTargetArn"]["Fn::GetAtt"].split(".")[0] if redrive else None,
                "max_receives": redrive["maxReceiveCount"] if redrive else None,
            }
        elif resource["Type"] == "AWS::S3::Bucket":
            bucket = sub(props["BucketName"])
    for logical, resource in resources.items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        binary = resource["Metadata"]["BuildProperties"]["Binary"]
        for event_name, event in resource["Properties"].get("Events", {}).items():
            if event["Type"] == "SQS":
                queue = event["Properties"]["Queue"]["Fn::GetAtt"].split(".")[0]
                routes.append({"queue": queue, "function": binary, "batch": event["Properties"].get("BatchSize", 10)})
            elif event["Type"] == "Schedule":
                props = event["Properties"]
                name = sub(props["Name"]) if "Name" in props else f"{STACK}-{logical}-{event_name}"
                schedules.append({"name": name, "expression": resolve(template, props["Schedule"]), "function": binary,
                                  "enabled": resolve(template, props.get("Enabled", True)), "kind": "rule"})
            elif event["Type"] == "ScheduleV2":
                # EventBridge Scheduler: a time zone, and the target's Input with
                # Scheduler's placeholders (filled in by `scheduler_input`).
                props = event["Properties"]
                name = sub(props["Name"]) if "Name" in props else f"{STACK}-{logical}-{event_name}"
                schedules.append({"name": name, "expression": resolve(template, props["ScheduleExpression"]),
                                  "function": binary, "kind": "scheduler",
                                  "timezone": props.get("ScheduleExpressionTimezone", "UTC"),
                                  "enabled": resolve(template, props.get("State", "ENABLED")) != "DISABLED",
                                  "input": props.get("Input", "{}")})
    return queues, routes, schedules, bucket


def create_event_rules(template, queues):
    """template.yaml's EventBridge rules, with their SQS targets, on moto's
    default bus: the moto extension emits EC2 state changes and Run Command
    status changes there, and moto routes them as EventBridge does."""
    import boto3

    events = boto3.client("events", endpoint_url=ENDPOINT, region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    names = []
    for logical, resource in sorted(template["Resources"].items()):
        # Optional rules (the job-ends topic) need parameters set only when deployed.
        if resource["Type"] != "AWS::Events::Rule" or "Condition" in resource:
            continue
        props = resource["Properties"]
        name = sub(props["Name"])
        events.put_rule(Name=name, EventPattern=json.dumps(props["EventPattern"]),
                        State=props.get("State", "ENABLED"), Description=props.get("Description", ""))
        targets = []
        for target in props["Targets"]:
            queue = queues[target["Arn"]["Fn::GetAtt"].split(".")[0]]
            targets.append({"Id": target["Id"], "Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue['name']}"})
        events.put_targets(Rule=name, Targets=targets)
        names.append(name)
    return names


def subscribe_to_flotilla_events(sqs):
    """A subscriber, as a user would add one: a queue and a rule on the
    default bus matching source "flotilla". The notify function's PutEvents
    reach it through moto's EventBridge, as they would on AWS."""
    import boto3

    events = boto3.client("events", endpoint_url=ENDPOINT, region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"{STACK}-events-local-subscriber"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    events.put_rule(Name=name, EventPattern=json.dumps({"source": ["flotilla"]}), State="ENABLED")
    events.put_targets(Rule=name, Targets=[{"Id": "subscriber", "Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"}])
    return url


# --- process management ---------------------------------------------------


def start(name, argv, env=None):
    os.makedirs(PIDS, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    out = open(os.path.join(LOGS, f"{name}.log"), "ab")
    process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy(), start_new_session=True)
    with open(os.path.join(PIDS, f"{name}.pid"), "w") as f:
        f.write(str(process.pid))
    return process


def wait_for(url, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except Exception:
            time.sleep(0.3)
    raise SystemExit(f"local-stack: {what} did not come up at {url} within {seconds} s (see {LOGS})")


def iam():
    import boto3

    return boto3.client("iam", endpoint_url=ENDPOINT, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")


def clients():
    import boto3

    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    return session.client("sqs", endpoint_url=ENDPOINT), session.client("s3", endpoint_url=ENDPOINT)


def up():
    if os.path.exists(os.path.join(PIDS, "moto.pid")):
        down(quiet=True)
    template = load_template()
    queues, routes, schedules, bucket = wiring(template)
    env = os.environ.copy()
    env.setdefault("FLOTILLA_EMU_SCRATCH", os.path.join(STATE, "instances"))
    start("moto", [sys.executable, os.path.join(ROOT, "tools", "moto_server.py"), "-H", "127.0.0.1", "-p", str(MOTO_PORT)], env)
    wait_for(f"{ENDPOINT}/moto-api/", 30, "moto server")
    log(f"moto server (with tools/flotilla_moto.py) on {ENDPOINT}")

    sqs, s3 = clients()
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    )
    # The deployment's worker profile (template.yaml's WorkerInstanceProfile):
    # the SSM agent registers only on instances that have one.
    iam().create_instance_profile(InstanceProfileName=WORKER_PROFILE)
    # template.yaml's StepOutputLogs: running steps stream their output here.
    step_logs = f"/flotilla/{STACK}/steps"
    import boto3

    boto3.client("logs", endpoint_url=ENDPOINT, region_name=REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_log_group(logGroupName=step_logs)
    urls = {}
    for logical in sorted(queues, key=lambda q: queues[q]["dlq"] is not None):  # DLQs first
        queue = queues[logical]
        attributes = {"VisibilityTimeout": str(min(queue["visibility"], LOCAL_VISIBILITY))}
        if queue["fifo"]:
            attributes["FifoQueue"] = "true"
        if queue["dlq"]:
            dlq_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queues[queue['dlq']]['name']}"
            attributes["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": queue["max_receives"]})
        urls[logical] = sqs.create_queue(QueueName=queue["name"], Attributes=attributes)["QueueUrl"]
    log(f"bucket {bucket} (SSE) and {len(urls)} queues from template.yaml")
    rules = create_event_rules(template, queues)
    log(f"EventBridge rules {', '.join(rules)} deliver EC2 and SSM events to the reconcile queue")
    events_url = subscribe_to_flotilla_events(sqs)
    log(f"Flotilla's own events (source flotilla) reach {events_url}, as an EventBridge rule delivers them")

    lines = {
        "AWS_ENDPOINT_URL": ENDPOINT,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FLOTILLA_BUCKET": bucket,
        "FLOTILLA_STACK": STACK,
        "FLOTILLA_JOBS_QUEUE_URL": urls["JobsQueue"],
        "FLOTILLA_RECONCILE_QUEUE_URL": urls["ReconcileQueue"],
        "FLOTILLA_JOBS_DLQ_URL": urls["JobsDLQ"],
        "FLOTILLA_RECONCILE_DLQ_URL": urls["ReconcileDeadLetterQueue"],
        "FLOTILLA_NOTIFY_QUEUE_URL": urls["NotifyQueue"],
        "FLOTILLA_NOTIFY_DLQ_URL": urls["NotifyDLQ"],
        "FLOTILLA_STEP_LOG_GROUP": step_logs,
        # A subscriber's queue: every Flotilla event of the local stack.
        "FLOTILLA_EVENTS_QUEUE_URL": events_url,
        "FLOTILLA_POLL_DELAY_SECONDS": POLL_DELAY,
        "FLOTILLA_SAFETY_POLL_SECONDS": SAFETY_POLL,
        "FLOTILLA_LAUNCH_ADMISSION": "true",
        "FLOTILLA_WORKER_INSTANCE_PROFILE": WORKER_PROFILE,
        "FLOTILLA_INVOKE_URL": f"http://127.0.0.1:{INVOKE_PORT}",
        "RUST_LOG": "info",
        # As template.yaml's LoggingConfig: JSON log lines, EMF lines at top level.
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
    }
    with open(ENV_FILE, "w") as f:
        f.write("# Written by `make local-up`. Source it to use awscli or flotilla against the local stack.\n")
        for key, value in lines.items():
            f.write(f"export {key}={value}\n")
    log(f"wrote {os.path.relpath(ENV_FILE, ROOT)}")

    watch_env = os.environ.copy()
    watch_env["PATH"] = f"{VENV_BIN}:{watch_env.get('PATH', '')}"
    # cargo lambda reads KEY=VALUE lines; it does not understand `export`.
    plain_env = os.path.join(STATE, "functions.env")
    with open(plain_env, "w") as f:
        for key, value in lines.items():
            f.write(f"{key}={value}\n")
    argv = [os.path.join(VENV_BIN, "cargo-lambda"), "lambda", "watch", "--ignore-changes", "--quiet",
            "-A", "127.0.0.1", "-P", str(INVOKE_PORT), "--env-file", plain_env, "--concurrency", str(PUMP_CONCURRENCY)]
    start("cargo-lambda-watch", argv, watch_env)
    wait_for(f"http://127.0.0.1:{INVOKE_PORT}/", 120, "cargo lambda watch")
    served = {r["function"] for r in routes} | {s["function"] for s in schedules}
    log(f"cargo lambda watch serving {', '.join(sorted(served))} on port {INVOKE_PORT}")
    start("pump", [sys.executable, os.path.abspath(__file__), "pump"])
    ticks = [f"{s['name']} every {local_interval(s['expression'])} s" for s in schedules if s["enabled"] and local_interval(s["expression"])]
    log(f"event pump started ({', '.join(ticks) or 'no rate schedules'}); logs in .flotilla/logs/")


def down(quiet=False):
    if not os.path.isdir(PIDS):
        if not quiet:
            log("nothing running")
        return
    for name in ("pump", "cargo-lambda-watch", "moto"):
        path = os.path.join(PIDS, f"{name}.pid")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            pid = int(f.read().strip())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.remove(path)
        if not quiet:
            log(f"stopped {name} (pid {pid})")


# --- the pump ---------------------------------------------------------------


def invoke(function, payload):
    url = f"http://127.0.0.1:{INVOKE_PORT}/2015-03-31/functions/{function}/invocations"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except Exception as err:
        return 0, str(err)


def sqs_record(message, queue_arn):
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": {},
        "md5OfBody": message.get("MD5OfBody") or hashlib.md5(message["Body"].encode()).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    }


def scheduled_event(rule):
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{rule}"],
        "detail": {},
    }


def scheduler_input(schedule, scheduled):
    """The Input a Scheduler schedule delivers, its context placeholders
    filled in as EventBridge Scheduler does (UTC, second precision)."""
    arn = f"arn:aws:scheduler:{REGION}:{ACCOUNT}:schedule/default/{schedule['name']}"
    text = schedule["input"].replace("<aws.scheduler.schedule-arn>", arn)
    text = text.replace("<aws.scheduler.scheduled-time>", scheduled.strftime("%Y-%m-%dT%H:%M:%SZ"))
    text = text.replace("<aws.scheduler.execution-id>", str(uuid.uuid4()))
    text = text.replace("<aws.scheduler.attempt-number>", "1")
    return json.loads(text)


def payload_for(schedule, scheduled):
    """What the function receives when the schedule fires at `scheduled`."""
    if schedule.get("kind") == "scheduler":
        return scheduler_input(schedule, scheduled)
    return scheduled_event(schedule["name"])


# --- AWS cron expressions in a time zone, as EventBridge Scheduler reads them ---

def _cron_field(text, low, high, names=None):
    """The values one field of an AWS cron expression allows (`*`, `?`,
    lists, ranges, `/` steps, month and weekday names). `L`, `W` and `#`
    are not supported locally and refuse the expression."""
    if text in ("*", "?"):
        return set(range(low, high + 1))
    values = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step = part.split("/")
            step = int(step)
        if names:
            for i, name in enumerate(names):
                part = part.upper().replace(name, str(i + low))
        if any(c in part for c in "LW#"):
            raise SystemExit(f"local-stack: cron field {text!r}: L, W and # are not supported locally")
        if part == "*":
            start, end = low, high
        elif "-" in part:
            start, end = (int(p) for p in part.split("-"))
        else:
            start = end = int(part)
            if step != 1:
                end = high
        values.update(range(start, end + 1, step))
    return values


def cron_fires(expression, timezone, after, count):
    """The next `count` UTC instants after `after` at which EventBridge
    Scheduler fires `cron(...)` in `timezone`. Scheduler evaluates the
    expression on the zone's wall clock: a time the spring change skips
    never fires, and a time the autumn change repeats fires once, the first
    time (Scheduler's user guide, "Daylight saving time")."""
    from zoneinfo import ZoneInfo

    fields = expression[len("cron("):-1].split()
    if len(fields) != 6:
        raise SystemExit(f"local-stack: {expression}: AWS cron has six fields")
    minutes = _cron_field(fields[0], 0, 59)
    hours = _cron_field(fields[1], 0, 23)
    days = _cron_field(fields[2], 1, 31)
    months = _cron_field(fields[3], 1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])
    # AWS numbers weekdays 1-7 from Sunday.
    weekdays = _cron_field(fields[4], 1, 7, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])
    years = _cron_field(fields[5], 1970, 2199)
    zone = ZoneInfo(timezone)
    fires = []
    at = after.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    horizon = at + datetime.timedelta(days=366 * 2)
    while len(fires) < count and at < horizon:
        local = at.astimezone(zone)
        weekday = (local.isoweekday() % 7) + 1  # Sunday 1 ... Saturday 7
        day_ok = (fields[2] == "?" or local.day in days) and (fields[4] == "?" or weekday in weekdays)
        if (local.minute in minutes and local.hour in hours and day_ok and local.month in months
                and local.year in years and local.fold == 0):
            fires.append(at)
        at += datetime.timedelta(minutes=1)
    return fires


def next_fire_at(schedule, after_epoch):
    """When a schedule next fires locally, in epoch seconds, or None."""
    if not schedule["enabled"]:
        return None
    interval = local_interval(schedule["expression"])
    if interval:
        return after_epoch + interval
    if schedule.get("kind") == "scheduler" and schedule["expression"].startswith("cron("):
        after = datetime.datetime.fromtimestamp(after_epoch, datetime.timezone.utc)
        fires = cron_fires(schedule["expression"], schedule["timezone"], after, 1)
        return fires[0].timestamp() if fires else None
    return None  # an EventBridge rule's cron fires only through `fire`


def rate_seconds(expression):
    if not expression.startswith("rate("):
        return None  # cron schedules fire only on demand: `local_stack.py fire`
    amount, unit = expression[5:-1].split()
    return int(amount) * {"minute": 60, "minutes": 60, "hour": 3600, "hours": 3600, "day": 86400, "days": 86400}[unit]


def local_interval(expression):
    """How often a schedule fires locally: a rate, capped at LOCAL_TICK; None for cron."""
    seconds = rate_seconds(expression)
    return min(seconds, LOCAL_TICK) if seconds else None


def deliver(route, url, arn, messages, sqs):
    """One SQS event batch to its function, as Lambda's poller delivers it."""
    started = time.time()
    status, response = invoke(route["function"], {"Records": [sqs_record(m, arn) for m in messages]})
    took = time.time() - started
    if status != 200 or not isinstance(response, dict):
        # A function error fails the whole batch, as Lambda does: every
        # record becomes visible again, here after the local visibility.
        log_timed(f"{route['function']}: invoke failed ({status}) after {took:.2f} s: {str(response)[:300]}")
        retry_soon(sqs, url, messages)
        return
    failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
    done = [m for m in messages if m["MessageId"] not in failed]
    for start_at in range(0, len(done), 10):
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done[start_at:start_at + 10])]
        for failure in sqs.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed", []):
            log_timed(f"{route['function']}: a handled record was not deleted: {failure}")
    retry_soon(sqs, url, [m for m in messages if m["MessageId"] in failed])
    log_timed(f"{route['function']}: {len(messages)} record(s) in {took:.2f} s, {len(failed)} returned for retry")


def retry_soon(sqs, url, messages):
    """Failed records come back after LOCAL_VISIBILITY seconds, not the
    template's visibility timeout they were received with."""
    for start_at in range(0, len(messages), 10):
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": LOCAL_VISIBILITY}
                   for i, m in enumerate(messages[start_at:start_at + 10])]
        sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)


def pump():
    template = load_template()
    queues, routes, schedules, _ = wiring(template)
    sqs, _ = clients()
    urls = {r["queue"]: sqs.get_queue_url(QueueName=queues[r["queue"]]["name"])["QueueUrl"] for r in routes}
    # Lambda's SQS poller runs several batches of one queue at once, so a
    # long pass for one job never holds back another job's events. Each
    # route gets as many batches in flight as cargo lambda runs instances.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=PUMP_CONCURRENCY * max(len(routes), 1) + 1)
    in_flight = {r["queue"]: set() for r in routes}
    ticking = {}
    # Disabled schedules never fire by themselves, as in EventBridge.
    next_fire = {s["name"]: next_fire_at(s, time.time()) for s in schedules}
    next_fire = {name: at for name, at in next_fire.items() if at is not None}
    while True:
        busy = False
        for route in routes:
            running = in_flight[route["queue"]]
            running -= {f for f in running if f.done()}
            if len(running) >= PUMP_CONCURRENCY:
                continue
            url = urls[route["queue"]]
            # Hidden for the template's visibility timeout (above the
            # function's timeout), as Lambda's poller receives them: a batch
            # still running is never received again by another.
            visibility = queues[route["queue"]]["visibility"]
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(route["batch"], 10), AttributeNames=["All"],
                                           WaitTimeSeconds=0, VisibilityTimeout=visibility).get("Messages", [])
            if not messages:
                continue
            busy = True
            arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queues[route['queue']]['name']}"
            running.add(pool.submit(guarded, deliver, route, url, arn, messages, sqs))
        now = time.time()
        for schedule in schedules:
            # One at a time per schedule: the tick has a reserved concurrency of 1.
            if schedule["name"] in next_fire and now >= next_fire[schedule["name"]] and schedule["name"] not in ticking:
                due = next_fire[schedule["name"]]
                next_fire[schedule["name"]] = next_fire_at(schedule, max(now, due))
                scheduled = datetime.datetime.fromtimestamp(due, datetime.timezone.utc).replace(microsecond=0)
                ticking[schedule["name"]] = pool.submit(guarded, fire_schedule, schedule, scheduled)
        ticking = {name: f for name, f in ticking.items() if not f.done()}
        if not busy:
            time.sleep(0.2)


def guarded(work, *args):
    """A pump thread's failure is logged, never lost in its future; the
    batch's records come back after their visibility timeout."""
    try:
        work(*args)
    except Exception as err:  # noqa: BLE001 -- the pump must go on
        log_timed(f"pump: {work.__name__} failed: {err!r}")


def fire_schedule(schedule, scheduled):
    status, response = invoke(schedule["function"], payload_for(schedule, scheduled))
    log_timed(f"schedule {schedule['name']}: {status} {str(response)[:200]}")


def fire(rule):
    _, _, schedules, _ = wiring(load_template())
    match = [s for s in schedules if s["name"] == rule]
    if not match:
        raise SystemExit(f"local-stack: no schedule {rule}; template.yaml has {', '.join(s['name'] for s in schedules)}")
    now = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    status, response = invoke(match[0]["function"], payload_for(match[0], now))
    print(json.dumps(response) if not isinstance(response, str) else response)
    return 0 if status == 200 else 1


# --- EC2 events and instance actions, by hand -------------------------------


def ec2_client():
    import boto3

    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    return session.client("ec2", endpoint_url=ENDPOINT)


def reconcile_queue_url(sqs):
    """FLOTILLA_RECONCILE_QUEUE_URL from .flotilla/local.env, else the
    ReconcileQueue that template.yaml names, as `up` created it."""
    try:
        with open(ENV_FILE) as f:
            for line in f:
                key, _, value = line.strip().removeprefix("export ").partition("=")
                if key == "FLOTILLA_RECONCILE_QUEUE_URL" and value:
                    return value
    except OSError:
        pass
    queues, _, _, _ = wiring(load_template())
    return sqs.get_queue_url(QueueName=queues["ReconcileQueue"]["name"])["QueueUrl"]


def instance_zone(ec2, instance_id):
    import botocore.exceptions

    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except botocore.exceptions.ClientError as err:
        raise SystemExit(f"local-stack: {instance_id}: {err}")
    return reservations[0]["Instances"][0]["Placement"]["AvailabilityZone"]


def spot_interruption_event(instance_id, zone):
    """As EventBridge delivers it (AWSEC2/latest/UserGuide/spot-instance-termination-notices.html):
    "The ARN format of the Spot Instance interruption event is
    arn:aws:ec2:availability-zone:instance/instance-id"."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "account": ACCOUNT,
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [f"arn:aws:ec2:{zone}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
    }


def interrupt(instance_id):
    ec2 = ec2_client()
    sqs, _ = clients()
    event = spot_interruption_event(instance_id, instance_zone(ec2, instance_id))
    url = reconcile_queue_url(sqs)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
    seconds = float(os.environ.get("FLOTILLA_EMU_RECLAIM_SECONDS", "120"))
    log(f"sent an EC2 Spot Instance Interruption Warning for {instance_id} to {url}")
    log(f"EC2 reclaims {instance_id} in {seconds:g} s (Ctrl-C to leave it running)")
    time.sleep(seconds)
    kill(instance_id)


def kill(instance_id):
    state = ec2_client().terminate_instances(InstanceIds=[instance_id])["TerminatingInstances"][0]["CurrentState"]["Name"]
    log(f"TerminateInstances {instance_id}: {state}")


def impair(instance_id):
    scratch = os.environ.get("FLOTILLA_EMU_SCRATCH", os.path.join(STATE, "instances"))
    os.makedirs(scratch, exist_ok=True)
    with open(os.path.join(scratch, "impaired"), "a") as f:
        f.write(instance_id + "\n")
    log(f"{instance_id} now fails its instance status check")


def stop(instance_id):
    state = ec2_client().stop_instances(InstanceIds=[instance_id])["StoppingInstances"][0]["CurrentState"]["Name"]
    log(f"StopInstances {instance_id}: {state}")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "help"
    if command == "up":
        up()
    elif command == "down":
        down()
    elif command == "pump":
        pump()
    elif command == "fire" and len(sys.argv) == 3:
        sys.exit(fire(sys.argv[2]))
    elif command == "payload" and len(sys.argv) == 4:
        # payload SCHEDULE SCHEDULED(RFC 3339): what its function receives when it fires then.
        _, _, found, _ = wiring(load_template())
        match = [s for s in found if s["name"] == sys.argv[2]]
        if not match:
            raise SystemExit(f"local-stack: no schedule {sys.argv[2]}")
        at = datetime.datetime.fromisoformat(sys.argv[3].replace("Z", "+00:00"))
        print(json.dumps(payload_for(match[0], at)))
    elif command == "next-fires" and len(sys.argv) == 6:
        # next-fires 'cron(...)' ZONE AFTER(RFC 3339) COUNT: when Scheduler would fire.
        after = datetime.datetime.fromisoformat(sys.argv[4].replace("Z", "+00:00"))
        for fire_at in cron_fires(sys.argv[2], sys.argv[3], after, int(sys.argv[5])):
            print(fire_at.strftime("%Y-%m-%dT%H:%M:%SZ"))
    elif command == "interrupt" and len(sys.argv) == 3:
        interrupt(sys.argv[2])
    elif command == "kill" and len(sys.argv) == 3:
        kill(sys.argv[2])
    elif command == "stop" and len(sys.argv) == 3:
        stop(sys.argv[2])
    elif command == "impair" and len(sys.argv) == 3:
        impair(sys.argv[2])
    else:
        print(__doc__)
        sys.exit(0 if command in ("help", "-h", "--help") else 2)
