"""Flotilla's moto extension: fills moto 5.2.5 gaps the way AWS documents them.

Loaded by tools/moto_server.py before moto's server starts. Every patched
behaviour is listed here and marked in responses that carry it: commands it
ran report "flotilla-emulator" in their StatusDetails-adjacent fields, and
the tests in tests/integration/moto_extension.rs pin each one.

Gaps filled (measured against moto 5.2.5):
1. SSM DescribeInstanceInformation is unimplemented: running EC2 instances
   report PingStatus Online FLOTILLA_EMU_AGENT_SECONDS after launch (default 2),
   stopped ones ConnectionLost; terminated ones are not listed.
2. SSM ListCommandInvocations is unimplemented: implemented, with Details.
3. SendCommand with only InstanceIds targets every instance in the region:
   now only the given instances (plus any matched by Targets).
4. GetCommandInvocation always returns Success with empty output: commands
   really run, with bash, in a scratch directory per instance under
   FLOTILLA_EMU_SCRATCH, with AWS_SSM_INSTANCE_ID set as the SSM agent does.
   executionTimeout gives TimedOut, exit codes give Failed, CancelCommand
   gives Cancelled. Output is written to S3 at AWS's key layout. Scripts that
   touch block devices (marked "# flotilla:volume-op") are not run: there is
   no EBS device here, and the invocation output says so.
5. RunInstances ignores ClientToken: a repeated token returns the first
   reservation, as EC2 does.
6. CreateVolume ignores ClientToken: a repeated token returns the first
   volume, as EC2 does.

7. Launch-template MetadataOptions and IamInstanceProfile are ignored, and a
   requested profile goes to the first instance only: the template's values
   apply unless RunInstances overrides them, and every instance gets the
   profile.
8. DescribeInstances MaxResults counts reservations: it counts instances,
   splitting a reservation across pages when needed.
9. AttachVolume re-attaches an attached volume and overwrites a device that
   is in use: the first now fails with VolumeInUse, the second with
   InvalidParameterValue ("Attachment point ... is already in use").

Not filled here:
- Schedules never fire: the local pump (tools/local_stack.py) fires them.
- template.yaml's bucket policy: its aws:SecureTransport=false statement
  blocks plain HTTP, and moto evaluates the Null condition of its
  unencrypted-write statement wrongly (it denies writes that carry SSE). The
  local bucket gets default SSE and no policy.
"""

import datetime
import os
import re
import shutil
import signal
import subprocess
import threading

from moto.core.responses import ActionResult
from moto.ec2.models import EC2Backend
from moto.ec2.models import ec2_backends
from moto.ssm import models as ssm_models
from moto.ssm.models import Command, SimpleSystemManagerBackend
from moto.ssm.responses import SimpleSystemManagerResponse

EMULATOR = "flotilla-emulator"
VOLUME_OP_MARKER = "# flotilla:volume-op"
AGENT_SECONDS = float(os.environ.get("FLOTILLA_EMU_AGENT_SECONDS", "2"))
SCRATCH = os.environ.get("FLOTILLA_EMU_SCRATCH", "/tmp/flotilla-emulator")
# GetCommandInvocation returns at most 24,000 characters of each stream;
# ListCommandInvocations' plugin Output at most 2,500.
GET_OUTPUT_LIMIT = 24000
LIST_OUTPUT_LIMIT = 2500

_lock = threading.Lock()


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


# --- 5. RunInstances ClientToken -------------------------------------------

_original_run_instances = EC2Backend.run_instances


def _run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
    token = kwargs.get("client_token")
    if token and token != "ABCDE":  # moto's default when no token is sent
        tokens = self.__dict__.setdefault("_flotilla_client_tokens", {})
        with _lock:
            if token in tokens:
                return tokens[token]
            reservation = _original_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
            tokens[token] = reservation
            return reservation
    return _original_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)


EC2Backend.run_instances = _run_instances


# --- 7. Launch templates' MetadataOptions and IamInstanceProfile ----------
# EC2 applies a launch template's MetadataOptions and IamInstanceProfile, with
# RunInstances parameters taking precedence, and gives the profile to every
# instance of the launch. moto ignores both template fields and associates a
# requested profile with the first instance only.

from moto.ec2.models.iam_instance_profile import IamInstanceProfileAssociationBackend  # noqa: E402
from moto.ec2.responses.instances import InstanceResponse  # noqa: E402

_in_run_instances = threading.local()
_run_instances_with_token = EC2Backend.run_instances


def _run_instances_with_template(self, image_id, count, user_data, security_group_names, **kwargs):
    profile = {"Name": kwargs.get("iam_instance_profile_name"), "Arn": kwargs.get("iam_instance_profile_arn")}
    if kwargs.get("launch_template"):
        data = self._get_template_from_args(kwargs["launch_template"]).data
        options = dict(data.get("MetadataOptions") or {})
        options.update(kwargs.get("metadata_options") or {})
        kwargs["metadata_options"] = options
        if not (profile["Name"] or profile["Arn"]):
            template_profile = data.get("IamInstanceProfile") or {}
            profile = {"Name": template_profile.get("Name"), "Arn": template_profile.get("Arn")}
    reservation = _run_instances_with_token(self, image_id, count, user_data, security_group_names, **kwargs)
    if profile["Name"] or profile["Arn"]:
        for instance in reservation.instances:
            if instance.id not in self.iam_instance_profile_associations:
                self.associate_iam_instance_profile(
                    instance_id=instance.id,
                    iam_instance_profile_name=profile["Name"],
                    iam_instance_profile_arn=profile["Arn"],
                )
    return reservation


EC2Backend.run_instances = _run_instances_with_template

_original_associate = IamInstanceProfileAssociationBackend.associate_iam_instance_profile


def _associate_iam_instance_profile(self, instance_id, iam_instance_profile_name=None, iam_instance_profile_arn=None):
    # moto's RunInstances response associates the first instance after the
    # backend did so for all; keep the association made at launch.
    known = self.iam_instance_profile_associations.get(instance_id)
    if known is not None and getattr(_in_run_instances, "active", False):
        return known
    return _original_associate(self, instance_id, iam_instance_profile_name, iam_instance_profile_arn)


IamInstanceProfileAssociationBackend.associate_iam_instance_profile = _associate_iam_instance_profile
EC2Backend.associate_iam_instance_profile = _associate_iam_instance_profile

_original_run_instances_response = InstanceResponse.run_instances


def _run_instances_response(self):
    _in_run_instances.active = True
    try:
        return _original_run_instances_response(self)
    finally:
        _in_run_instances.active = False


InstanceResponse.run_instances = _run_instances_response


# --- 8. DescribeInstances MaxResults counts instances ----------------------
# EC2's MaxResults (5-1000) caps the instances on a page, splitting a
# reservation across pages if need be; moto counts reservations.

_original_describe_instances = InstanceResponse.describe_instances
_TOKEN_PREFIX = "flotilla-offset-"


def _describe_instances(self):
    if "MaxResults" not in self.data or self._get_param("InstanceIds", []):
        return _original_describe_instances(self)
    import copy

    self.error_on_dryrun()
    reservations = self.ec2_backend.describe_instances(filters=self._filters_from_querystring())
    pairs = [(reservation, instance) for reservation in reservations for instance in reservation.instances]
    token = self._get_param("NextToken") or ""
    start = int(token[len(_TOKEN_PREFIX):]) if token.startswith(_TOKEN_PREFIX) else 0
    max_results = max(5, min(1000, int(self._get_param("MaxResults"))))
    page = []
    for reservation, instance in pairs[start:start + max_results]:
        if not page or page[-1].id != reservation.id:
            part = copy.copy(reservation)
            part.instances = []
            page.append(part)
        page[-1].instances.append(instance)
    end = start + max_results
    next_token = f"{_TOKEN_PREFIX}{end}" if end < len(pairs) else None
    return ActionResult({"Reservations": page, "NextToken": next_token})


InstanceResponse.describe_instances = _describe_instances


# --- 6. CreateVolume ClientToken -------------------------------------------

from moto.ec2.responses.elastic_block_store import ElasticBlockStore  # noqa: E402

_original_create_volume = ElasticBlockStore.create_volume


def _create_volume(self):
    token = self._get_param("ClientToken")
    if not token:
        return _original_create_volume(self)
    backend = self.ec2_backend
    tokens = backend.__dict__.setdefault("_flotilla_volume_tokens", {})
    with _lock:
        known = tokens.get(token)
        if known in backend.volumes:
            return ActionResult(backend.volumes[known])
        result = _original_create_volume(self)
        tokens[token] = result.result.id
        return result


ElasticBlockStore.create_volume = _create_volume


# --- 9. AttachVolume refuses a volume or device in use ----------------------
# Checked at the API, not in the backend: moto's own RunInstances attaches
# root volumes through the backend.

from moto.ec2.exceptions import EC2ClientError, VolumeInUseError  # noqa: E402

_attach_lock = threading.Lock()
_original_attach_volume = ElasticBlockStore.attach_volume


def _attach_volume(self):
    volume_id = self._get_param("VolumeId")
    instance_id = self._get_param("InstanceId")
    device_path = self._get_param("Device")
    backend = self.ec2_backend
    with _attach_lock:
        volume = backend.get_volume(volume_id)
        if volume.attachment is not None:
            raise VolumeInUseError(volume_id, volume.attachment.instance.id)
        if device_path in backend.get_instance(instance_id).block_device_mapping:
            raise EC2ClientError("InvalidParameterValue", f"Attachment point {device_path} is already in use")
        return _original_attach_volume(self)


ElasticBlockStore.attach_volume = _attach_volume


# --- 3. SendCommand targets only what it names -----------------------------

_original_targets = Command._get_instance_ids_from_targets


def _instance_ids_from_targets(self):
    if not self.targets:
        return []
    return _original_targets(self)


Command._get_instance_ids_from_targets = _instance_ids_from_targets


# --- 4. Commands really run ------------------------------------------------


class Execution:
    """One command on one instance."""

    def __init__(self, command, instance_id):
        self.command = command
        self.instance_id = instance_id
        self.status = "InProgress"
        self.response_code = -1
        self.stdout = ""
        self.stderr = ""
        self.started = _now()
        self.ended = None
        self.process = None
        self.cancelled = False
        self.stdout_url = ""
        self.stderr_url = ""

    def finished(self):
        return self.status not in ("Pending", "InProgress", "Cancelling")


def _script(command):
    return "\n".join(command.parameters.get("commands", []))


def _timeout(command):
    values = command.parameters.get("executionTimeout") or ["3600"]
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return 3600


def _write_output(execution):
    command = execution.command
    bucket = command.output_s3_bucket_name
    if not bucket:
        return
    from moto.s3.models import s3_backends

    try:
        backend = s3_backends[command.account_id]["aws"]
    except KeyError:
        backend = s3_backends[command.account_id]["global"]
    prefix = command.output_s3_key_prefix.rstrip("/")
    base = f"{prefix}/{command.command_id}/{execution.instance_id}/awsrunShellScript/0.awsrunShellScript"
    region = command.backend_region
    for name, content in (("stdout", execution.stdout), ("stderr", execution.stderr)):
        if not content:
            continue
        key = f"{base}/{name}".lstrip("/")
        try:
            backend.put_object(bucket, key, content.encode(), encryption="AES256")
        except Exception as err:  # the bucket may not exist; SSM then reports no URL
            execution.stderr += f"\n[{EMULATOR}] could not write {name} to s3://{bucket}/{key}: {err}"
            continue
        url = f"https://s3.{region}.amazonaws.com/{bucket}/{key}"
        if name == "stdout":
            execution.stdout_url = url
        else:
            execution.stderr_url = url


def _run(execution):
    command = execution.command
    script = _script(command)
    if script.startswith(VOLUME_OP_MARKER):
        op = script.splitlines()[0][len(VOLUME_OP_MARKER):].strip() or "volume operation"
        mine = re.findall(re.escape(execution.instance_id) + r"\) VOLUME_ID=(vol-[0-9a-f]+)", script)
        mounts = sorted(set(re.findall(r"(?:mkdir -p|umount) (\S+)", script)))
        what = ", ".join(mine) if mine else "this instance's volumes"
        where = ", ".join(mounts) or "their mount points"
        if op == "mount":
            plan = f"would find {what} by NVMe id under /dev/disk/by-id, mkfs.ext4 if blank, mount at {where}"
        else:
            plan = f"would sync and umount {where}"
        execution.stdout = f"[{EMULATOR}] {op} skipped: no EBS block devices on this machine; {plan}\n"
        execution.status, execution.response_code = "Success", 0
        execution.ended = _now()
        _write_output(execution)
        return
    home = os.path.join(SCRATCH, execution.instance_id)
    work = os.path.join(home, "work")
    os.makedirs(work, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "LANG": "C.UTF-8",
        "AWS_SSM_INSTANCE_ID": execution.instance_id,
        "AWS_SSM_REGION_NAME": command.backend_region,
        "FLOTILLA_EMULATOR": "1",
    }
    if execution.cancelled:  # cancelled before it started
        execution.status, execution.ended = "Cancelled", _now()
        return
    try:
        execution.process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if execution.cancelled:  # cancelled while it was starting
            os.killpg(execution.process.pid, signal.SIGKILL)
        try:
            out, err = execution.process.communicate(timeout=_timeout(command))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(execution.process.pid, signal.SIGKILL)
            out, err = execution.process.communicate()
            timed_out = True
        execution.stdout = out.decode(errors="replace")
        execution.stderr = err.decode(errors="replace")
        if execution.cancelled:
            execution.status, execution.response_code = "Cancelled", -1
        elif timed_out:
            execution.status, execution.response_code = "TimedOut", -1
        else:
            code = execution.process.returncode
            execution.response_code = code if code >= 0 else 128 - code
            execution.status = "Success" if code == 0 else "Failed"
    except Exception as err:  # surface emulator trouble as a failed invocation
        execution.stderr += f"[{EMULATOR}] {err}"
        execution.status, execution.response_code = "Failed", 1
    execution.ended = _now()
    _write_output(execution)


def _executions(backend):
    return backend.__dict__.setdefault("_flotilla_executions", {})


_original_send_command = SimpleSystemManagerBackend.send_command


def _send_command(self, **kwargs):
    command = _original_send_command(self, **kwargs)
    executions = _executions(self)
    for instance_id in command.instance_ids:
        execution = Execution(command, instance_id)
        executions[(command.command_id, instance_id)] = execution
        threading.Thread(target=_run, args=(execution,), daemon=True).start()
    return command


SimpleSystemManagerBackend.send_command = _send_command


def _invocation(backend, command, instance_id, details_limit=None):
    execution = _executions(backend).get((command.command_id, instance_id))
    if execution is None:
        return None
    ended = execution.ended or _now()
    elapsed = (ended - execution.started).total_seconds()
    body = {
        "CommandId": command.command_id,
        "InstanceId": instance_id,
        "Comment": command.comment,
        "DocumentName": command.document_name,
        "DocumentVersion": "$DEFAULT",
        "PluginName": "aws:runShellScript",
        "ResponseCode": execution.response_code,
        "ExecutionStartDateTime": execution.started.isoformat(),
        "ExecutionElapsedTime": f"PT{elapsed:.3f}S",
        "ExecutionEndDateTime": execution.ended.isoformat() if execution.ended else "",
        "Status": execution.status,
        "StatusDetails": execution.status,
        "StandardOutputContent": execution.stdout[:GET_OUTPUT_LIMIT],
        "StandardOutputUrl": execution.stdout_url,
        "StandardErrorContent": execution.stderr[:GET_OUTPUT_LIMIT],
        "StandardErrorUrl": execution.stderr_url,
    }
    return body


def _get_command_invocation(self, command_id, instance_id, plugin_name):
    command = self.get_command_by_id(command_id)
    body = _invocation(self, command, instance_id)
    if body is None:
        from moto.core.exceptions import RESTError

        raise RESTError("InvocationDoesNotExist", "An error occurred (InvocationDoesNotExist) when calling the GetCommandInvocation operation")
    return body


SimpleSystemManagerBackend.get_command_invocation = _get_command_invocation


# --- 2. ListCommandInvocations, and CancelCommand --------------------------


def list_command_invocations(self):
    command_id = self._get_param("CommandId")
    instance_id = self._get_param("InstanceId")
    details = self._get_param("Details", False)
    backend = self.ssm_backend
    commands = [backend.get_command_by_id(command_id)] if command_id else list(backend._commands)
    invocations = []
    for command in commands:
        for target in command.instance_ids:
            if instance_id and target != instance_id:
                continue
            body = _invocation(backend, command, target)
            if body is None:
                continue
            item = {
                "CommandId": body["CommandId"],
                "InstanceId": target,
                "Comment": body["Comment"],
                "DocumentName": body["DocumentName"],
                "DocumentVersion": body["DocumentVersion"],
                "RequestedDateTime": command.requested_date_time,
                "Status": body["Status"],
                "StatusDetails": body["StatusDetails"],
                "StandardOutputUrl": body["StandardOutputUrl"],
                "StandardErrorUrl": body["StandardErrorUrl"],
            }
            if details:
                item["CommandPlugins"] = [
                    {
                        "Name": "aws:runShellScript",
                        "Status": body["Status"],
                        "StatusDetails": body["StatusDetails"],
                        "ResponseCode": body["ResponseCode"],
                        "Output": (body["StandardOutputContent"] + body["StandardErrorContent"])[-LIST_OUTPUT_LIMIT:],
                        "StandardOutputUrl": body["StandardOutputUrl"],
                        "StandardErrorUrl": body["StandardErrorUrl"],
                    }
                ]
            invocations.append(item)
    return ActionResult({"CommandInvocations": invocations})


def cancel_command(self):
    command_id = self._get_param("CommandId")
    backend = self.ssm_backend
    backend.get_command_by_id(command_id)  # InvalidCommandId if unknown
    for (cid, _), execution in list(_executions(backend).items()):
        if cid != command_id or execution.finished():
            continue
        execution.cancelled = True
        if execution.process is not None and execution.process.poll() is None:
            try:
                os.killpg(execution.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return ActionResult({})


SimpleSystemManagerResponse.list_command_invocations = list_command_invocations
SimpleSystemManagerResponse.cancel_command = cancel_command


# --- 1. DescribeInstanceInformation ----------------------------------------


def describe_instance_information(self):
    wanted = set()
    for f in self._get_param("Filters", []) or []:
        if f.get("Key") == "InstanceIds":
            wanted.update(f.get("Values", []))
    for f in self._get_param("InstanceInformationFilterList", []) or []:
        if f.get("key") == "InstanceIds":
            wanted.update(f.get("valueSet", []))
    ec2 = ec2_backends[self.current_account][self.region]
    now = _now()
    items = []
    for reservation in ec2.all_reservations():
        for instance in reservation.instances:
            if wanted and instance.id not in wanted:
                continue
            state = instance.state
            if state == "terminated" or state == "shutting-down":
                continue
            launched = instance.launch_time
            if isinstance(launched, str):
                launched = datetime.datetime.fromisoformat(launched.replace("Z", "+00:00"))
            if launched.tzinfo is None:
                launched = launched.replace(tzinfo=datetime.timezone.utc)
            booted = (now - launched).total_seconds() >= AGENT_SECONDS
            if state == "running" and not booted:
                continue  # the agent has not registered yet
            items.append(
                {
                    "InstanceId": instance.id,
                    "PingStatus": "Online" if state == "running" else "ConnectionLost",
                    "LastPingDateTime": now,
                    "AgentVersion": f"3.3.0-{EMULATOR}",
                    "IsLatestVersion": True,
                    "PlatformType": "Linux",
                    "PlatformName": "Amazon Linux",
                    "PlatformVersion": "2023",
                    "ResourceType": "EC2Instance",
                    "IPAddress": instance.private_ip,
                    "ComputerName": f"{instance.id}.{EMULATOR}",
                }
            )
    return ActionResult({"InstanceInformationList": items})


SimpleSystemManagerResponse.describe_instance_information = describe_instance_information


def reset_scratch():
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH, exist_ok=True)
