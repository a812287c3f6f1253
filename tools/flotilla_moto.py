"""Flotilla's moto extension: fills moto 5.2.5 gaps the way AWS documents them.

Loaded by tools/moto_server.py before moto's server starts. Every patched
behaviour is listed here and marked in responses that carry it: commands it
ran report "flotilla-emulator" in their StatusDetails-adjacent fields, and
the tests in tests/integration/moto_extension.rs pin each one.

Gaps filled (measured against moto 5.2.5):
1. SSM DescribeInstanceInformation is unimplemented (implemented, paged as
   the API model says: MaxResults 5-50, default 10, NextToken; at most 100
   filter values; an id that is no instance of the account is refused with
   InvalidInstanceId), and SendCommand accepts
   any instance id. The SSM agent registers only on an instance with an IAM
   instance profile (AWS: the agent needs an instance profile with SSM
   permissions, or Default Host Management Configuration, which is not
   emulated): such an instance reports PingStatus Online
   FLOTILLA_EMU_AGENT_SECONDS (default 2) after launch or start, and
   ConnectionLost while stopped; instances without a profile never register
   and are never listed; terminated ones are not listed. SendCommand to an
   instance whose agent never registered, or that is shutting-down or
   terminated, fails with InvalidInstanceId (HTTP 400); a registered instance
   that is stopped or stopping is a valid target, and its invocation stays
   Delayed until the instance runs again or the command expires.
2. SSM ListCommandInvocations is unimplemented: implemented, with Details
   (plugin Output: stdout, SSM's error separator, stderr; 2,500 characters)
   and paging as SSM pages it (MaxResults 1-50, default 50, NextToken).
3. SendCommand with only InstanceIds targets every instance in the region:
   now only the given instances (plus registered ones matched by Targets).
4. GetCommandInvocation always returns Success with empty output: commands
   really run, with bash, in a scratch directory per instance under
   FLOTILLA_EMU_SCRATCH, with AWS_SSM_INSTANCE_ID set as the SSM agent does.
   executionTimeout gives TimedOut (ExecutionTimedOut), exit codes give
   Failed, CancelCommand gives Cancelled. Output is written to S3 at AWS's key
   layout. Commands run inside their instance (gap 21); where real block
   devices cannot be had, scripts that touch them (marked "# flotilla:volume-op")
   are not run, and the invocation output says so.
5. RunInstances ignores ClientToken: a repeated token with the same
   parameters returns the first reservation, as EC2 does; with different
   parameters (other than the Availability Zone) it fails with
   IdempotentParameterMismatch (HTTP 400). A refused request does not use up
   its token.
6. CreateVolume ignores ClientToken: a repeated token returns the first
   volume, as EC2 does; with different parameters (other than the
   Availability Zone) it fails with IdempotentParameterMismatch (HTTP 400),
   as "Ensuring idempotency in Amazon EC2 API requests" says.

7. Launch-template MetadataOptions and IamInstanceProfile are ignored, and a
   requested profile goes to the first instance only: the template's values
   apply unless RunInstances overrides them, and every instance gets the
   profile.
8. DescribeInstances MaxResults counts reservations: it counts instances,
   splitting a reservation across pages when needed.
9. AttachVolume re-attaches an attached volume and overwrites a device that
   is in use: the first now fails with VolumeInUse, the second with
   InvalidParameterValue ("Attachment point ... is already in use").
10. A command keeps running, and reports Success, on an instance that was
   stopped or terminated under it: the instance's SSM agent dies with it, so
   its unfinished invocations are killed (the bash process group gets
   SIGKILL), write no output, and stay InProgress until the command expires
   (SendCommand TimeoutSeconds, default 3600, plus executionTimeout, after
   SendCommand); then they are TimedOut with StatusDetails DeliveryTimedOut,
   as SSM marks invocations whose agent never sent a terminal response. They
   are never Success.
11. EC2 never runs out of capacity. For tests: RunInstances for an instance
   type listed in FLOTILLA_EMU_NO_CAPACITY (comma-separated) or in the file
   $FLOTILLA_EMU_SCRATCH/no-capacity (one per line, re-read on every call)
   fails with InsufficientInstanceCapacity, a server error (HTTP 500), with
   EC2's message ("We currently do not have sufficient <type> capacity in the
   Availability Zone you requested (<az>). ..."). The pseudo type "spot"
   refuses every spot request (InstanceMarketOptions MarketType=spot, in the
   request or its launch template) with InsufficientInstanceCapacity "There
   is no Spot capacity available that matches your request."

12. RunInstances launches MinCount instances: it launches MaxCount, as EC2
    does when capacity allows (capacity refusals are gap 11's).

13. moto does not evaluate IAM: for tests, EC2 actions listed in
    $FLOTILLA_EMU_SCRATCH/refuse (DeleteVolume for now) fail with
    UnauthorizedOperation (403), as an IAM denial does.

14. Status checks always pass. For tests: instances listed in
    $FLOTILLA_EMU_SCRATCH/impaired (one id per line, re-read on every call)
    fail their instance status check, as EC2 reports one: DescribeInstanceStatus
    gives InstanceStatus "impaired" with reachability "failed" and an
    ImpairedSince time. Such an instance is unreachable, so its registered SSM
    agent reports ConnectionLost and SendCommand cannot reach it.
    `tools/local_stack.py impair <id>` adds one.

15. Commands run on the host, with no instance profile behind them: they get
    credentials for this server (AWS_ENDPOINT_URL and test keys) and the
    venv's AWS CLI on PATH, as an instance reaches AWS with its profile's
    credentials and Amazon Linux's CLI. Secrets jobs name by reference are
    read this way. moto does not evaluate IAM, so the worker role's limits
    (this stack's parameter path only) are not enforced here.

16. DescribeVolumes and DescribeSnapshots ignore MaxResults and never page.
    Here they page as EC2 does: MaxResults 5-500 (volumes) or 5-1000
    (snapshots), refused beside explicit ids or out of range, with a
    NextToken while more remain.
17. No service events reach EventBridge. Here EC2 emits "EC2 Instance
    State-change Notification" (pending, running; stopping, stopped;
    shutting-down, terminated) and SSM "EC2 Command Invocation Status-change
    Notification" when an invocation ends, onto the default bus, where rules
    route them (moto's EventBridge delivers to SQS targets). EBS sends an
    "EBS Snapshot Notification" (createSnapshot, succeeded) when a snapshot
    completes.
18. Snapshots are completed the moment they exist. Here they stay `pending`
    for FLOTILLA_EMU_SNAPSHOT_SECONDS (default 2), as EBS's do ("Snapshot
    creation is asynchronous ... it remains in the pending state until all
    of data has been transferred").
19. ListCommands is consistent at once. AWS documents no read-after-write
    consistency for it (the Run Command API "follows an eventual consistency
    model", GetCommandInvocation reference): here a command is left out of
    ListCommands by instance for FLOTILLA_EMU_LIST_LAG_SECONDS (default 1)
    after SendCommand, or for the seconds in $FLOTILLA_EMU_SCRATCH/list-lag
    (re-read on every call). Lookups by CommandId are not delayed.
20. An invocation its instance's stop killed stays lost. Here, when the
    instance starts again before the command expires, its agent delivers
    the invocation again and the script runs again from the start, as the
    agent resumes a document interrupted by a reboot (AWS documents this
    for reboots a script asks for, exit 194, and says nothing of others; we
    take the unkind reading). Flotilla's step guard then answers with its
    reserved code.
21. An EBS volume holds no bytes and an instance is the host. Here every
    instance is a PID and mount namespace whose init is a holder process
    (tools/emu_holder.py), started when the instance first runs a command or
    gets a volume; each SSM command enters it (nsenter, then chroot into the
    instance's own root: an overlay of the host's `/` whose writes stay with
    the instance), so processes a step leaves running live on between
    commands, and stopping or terminating the instance kills every one of
    them. Every volume has a sparse backing file in an XFS store; attached
    to a running instance it is a loop device shown only inside that
    instance, as /dev/nvme<N>n1 with the by-id link EC2 gives it
    (/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id>). CreateSnapshot
    takes a point-in-time, crash-consistent copy of its blocks (a reflink
    clone, see tools/flotilla_devices.py); CreateVolume from a snapshot
    starts from them; DeleteVolume and DeleteSnapshot free them. DetachVolume
    of a volume its instance has mounted leaves it attached, the attachment
    `busy`, until the instance unmounts it, stops or terminates (DetachVolume
    reference), unless forced. Past the store's budget CreateVolume fails with
    VolumeLimitExceeded and CreateSnapshot with SnapshotLimitExceeded. Without
    root, loop devices or mkfs.xfs the server says so in one line and skips
    block-device scripts (gap 4); with CI=true it refuses to start.
22. SendTaskSuccess, SendTaskFailure and SendTaskHeartbeat accept any token
    and do nothing. Here a task exists only while waiting: tokens listed in
    $FLOTILLA_EMU_SCRATCH/sfn-open (one per line, re-read on every call) wait;
    a success or failure closes one, and after that, or for a token in
    $FLOTILLA_EMU_SCRATCH/sfn-timed-out, every call fails with TaskTimedOut
    ("The task token has either expired or the task associated with the
    token has already been closed"); any other token with TaskDoesNotExist.
    Output over 262,144 bytes fails with InvalidOutput. Every call is
    appended to $FLOTILLA_EMU_SCRATCH/sfn-calls.jsonl, for tests to read.
23. PutEvents never fails an entry. EventBridge may: a call answered with
    HTTP 200 can report some entries failed (FailedEntryCount, and an
    ErrorCode such as InternalFailure or ThrottlingException on each), and
    the caller must send those again, and an entry with a code AWS calls
    non-retryable (MalformedDetail, AccessDeniedException, ...) fails the
    same way every time. For tests: the next N entries fail that way, read
    from $FLOTILLA_EMU_SCRATCH/put-events-fail as "N" (InternalFailure) or
    "N CODE", and counted down there.
25. SendCommand ignores CloudWatchOutputConfig. Here, when it is enabled,
    each invocation's stdout and stderr are streamed, as they are written,
    to the log group (created if missing, as the agent does with
    logs:CreateLogGroup) in streams <command id>/<instance id>/
    aws-runShellScript/stdout and .../stderr: complete lines, put about
    every second (the agent's upload interval), one event per non-empty
    line (CloudWatch Logs refuses empty messages); the rest when the step
    ends. The S3 copy still comes only at the end.
24. DescribeSpotPriceHistory answers every offered type with a price of
    $0.00001 stamped 2006, whatever the window or product asked. Here the
    history is what $FLOTILLA_EMU_SCRATCH/spot-prices holds (lines "TYPE
    ZONE USD HOURS_AGO", Linux/UNIX), and it is answered as EC2 documents:
    the prices that changed within StartTime..EndTime, plus for each type
    and zone the last change before StartTime ("the effective price as of
    the start time"), filtered by InstanceTypes and ProductDescriptions,
    newest first. Without the file there is no history.

Not filled here:
- Schedules never fire: the local pump (tools/local_stack.py) fires them.
- Other EventBridge events (spot warnings, rebalance) are not emitted:
  `tools/local_stack.py interrupt <id>` puts an "EC2 Spot Instance Interruption Warning" on the reconcile queue and
  terminates the instance after FLOTILLA_EMU_RECLAIM_SECONDS (default 120).
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
import sys
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
SNAPSHOT_SECONDS = float(os.environ.get("FLOTILLA_EMU_SNAPSHOT_SECONDS", "2"))
LIST_LAG_SECONDS = float(os.environ.get("FLOTILLA_EMU_LIST_LAG_SECONDS", "1"))
SCRATCH = os.environ.get("FLOTILLA_EMU_SCRATCH", "/tmp/flotilla-emulator")
# GetCommandInvocation returns at most 24,000 characters of each stream;
# ListCommandInvocations' plugin Output at most 2,500.
GET_OUTPUT_LIMIT = 24000
LIST_OUTPUT_LIMIT = 2500

_lock = threading.Lock()


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


# --- 5. RunInstances ClientToken, and 11. capacity refusals ----------------

from moto.ec2.exceptions import EC2ClientError  # noqa: E402

# The request being served: InstanceResponse.run_instances (below, with 7)
# records the request's fingerprint here for the backend.
_in_run_instances = threading.local()

# EC2: "If you retry a successful request using the same client token, but one
# or more of the parameters are different, other than the Region or
# Availability Zone, the retry fails with an IdempotentParameterMismatch
# error." (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html)
_NOT_FINGERPRINTED = ("ClientToken", "TagSpecification.", "Placement.AvailabilityZone", "Action", "Version")


def _request_fingerprint(querystring):
    return tuple(
        sorted((key, tuple(values)) for key, values in querystring.items() if not key.startswith(_NOT_FINGERPRINTED))
    )


class IdempotentParameterMismatch(EC2ClientError):
    # A client error, 400 (Run_Instance_Idempotency "400 (Client Error)");
    # the message is the one EC2 returns.
    def __init__(self):
        super().__init__(
            "IdempotentParameterMismatch",
            "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
        )


class InsufficientInstanceCapacity(EC2ClientError):
    """Listed under "Server error codes" (AWSEC2/latest/APIReference/errors-overview.html):
    EC2 answers it with HTTP 500, which the SDKs retry before giving up."""

    http_status = 500

    def __init__(self, message):
        super().__init__("InsufficientInstanceCapacity", message)


def _refused_types():
    listed = os.environ.get("FLOTILLA_EMU_NO_CAPACITY", "").split(",")
    try:  # re-read on every call: a test may change it at run time
        with open(os.path.join(SCRATCH, "no-capacity")) as f:
            listed += f.read().splitlines()
    except OSError:
        pass
    return {line.split("#")[0].strip() for line in listed} - {""}


def _check_capacity(backend, kwargs):
    refused = _refused_types()
    if not refused:
        return
    template = backend._get_template_from_args(kwargs["launch_template"]).data if kwargs.get("launch_template") else {}
    instance_type = kwargs.get("instance_type", "m1.small")
    if kwargs.get("is_instance_type_default") and template.get("InstanceType"):
        instance_type = template["InstanceType"]
    market = kwargs.get("instance_market_options") or (template.get("InstanceMarketOptions") or {}).get("MarketType")
    spot = market == "spot"
    if not (instance_type in refused or (spot and "spot" in refused)):
        return
    if spot:
        # One-time spot through RunInstances: EC2 fails the call rather than
        # leaving an open request, e.g. "InsufficientInstanceCapacity: There is
        # no Spot capacity available that matches your request." (status 500).
        raise InsufficientInstanceCapacity("There is no Spot capacity available that matches your request.")
    if kwargs.get("subnet_id"):
        zone = backend.get_subnet(kwargs["subnet_id"]).availability_zone
    else:
        zone = kwargs.get("placement") or (template.get("Placement") or {}).get("AvailabilityZone")
        zone = zone or backend.region_name + "a"
    # EC2's message; its last sentence ("You can currently get <type> capacity
    # by ... choosing <zones>.") is left out: no zone has capacity here.
    raise InsufficientInstanceCapacity(
        f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested "
        f"({zone}). Our system will be working on provisioning additional capacity."
    )


_original_run_instances = EC2Backend.run_instances


def _run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
    token = kwargs.get("client_token")
    if token and token != "ABCDE":  # moto's default when no token is sent
        fingerprint = getattr(_in_run_instances, "fingerprint", None)
        tokens = self.__dict__.setdefault("_flotilla_client_tokens", {})
        with _lock:
            if token in tokens:
                reservation, first = tokens[token]
                if fingerprint is not None and first is not None and fingerprint != first:
                    raise IdempotentParameterMismatch()
                return reservation
            _check_capacity(self, kwargs)
            reservation = _original_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
            # Only a successful request binds its token.
            tokens[token] = (reservation, fingerprint)
            return reservation
    _check_capacity(self, kwargs)
    return _original_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)


EC2Backend.run_instances = _run_instances


# --- 7. Launch templates' MetadataOptions and IamInstanceProfile ----------
# EC2 applies a launch template's MetadataOptions and IamInstanceProfile, with
# RunInstances parameters taking precedence, and gives the profile to every
# instance of the launch. moto ignores both template fields and associates a
# requested profile with the first instance only.

from moto.ec2.models.iam_instance_profile import IamInstanceProfileAssociationBackend  # noqa: E402
from moto.ec2.responses.instances import InstanceResponse  # noqa: E402

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

_run_instances_quietly = EC2Backend.run_instances
_announced = set()  # instances whose launch was announced (a repeated token returns them again)


def _run_instances_announced(self, image_id, count, user_data, security_group_names, **kwargs):
    reservation = _run_instances_quietly(self, image_id, count, user_data, security_group_names, **kwargs)
    for instance in reservation.instances:
        if instance.id not in _announced:
            _announced.add(instance.id)
            _state_change(self, instance.id, "pending", "running")
    return reservation


EC2Backend.run_instances = _run_instances_announced

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
    _in_run_instances.fingerprint = _request_fingerprint(self.querystring)
    # Gap 12: moto launches MinCount instances. EC2 (RunInstances reference,
    # MaxCount): "If MaxCount is set higher than what Amazon EC2 can launch in
    # the target Availability Zone, Amazon EC2 launches the largest possible
    # number of instances above MinCount." Capacity here is unlimited (unless
    # refused outright), so EC2 would launch MaxCount.
    if "MaxCount" in self.querystring:
        self.querystring["MinCount"] = list(self.querystring["MaxCount"])
    params = getattr(self, "params", None)
    if self.automated_parameter_parsing and isinstance(params, dict) and "MaxCount" in params:
        params["MinCount"] = params["MaxCount"]
    try:
        return _original_run_instances_response(self)
    except InsufficientInstanceCapacity as err:
        status, headers, body = self.serialized(ActionResult(err))
        headers["status"] = err.http_status
        return body, headers
    finally:
        _in_run_instances.active = False
        _in_run_instances.fingerprint = None


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


# --- 16. DescribeVolumes and DescribeSnapshots page ------------------------
# EC2 honours MaxResults (volumes 5-500, snapshots 5-1000; refused beside
# explicit ids or out of range) and answers a NextToken while more remain;
# moto returns everything at once and never a token.

from moto.ec2.responses.elastic_block_store import ElasticBlockStore as _Ebs  # noqa: E402


def _paged(name, key, ids_param, most, original):
    def describe(self):
        if "MaxResults" not in self.data:
            return original(self)
        max_results = int(self._get_param("MaxResults"))
        if self._get_param(ids_param, []):
            raise EC2ClientError("InvalidParameterCombination", f"The parameter {ids_param} cannot be used with MaxResults")
        if not 5 <= max_results <= most:
            raise EC2ClientError("InvalidParameterValue", f"Value ( {max_results} ) for parameter maxResults is invalid. Expecting a value between 5 and {most}.")
        self.error_on_dryrun()
        filters = self._filters_from_querystring()
        if name == "volumes":
            items = list(self.ec2_backend.describe_volumes(volume_ids=[], filters=filters))
        else:
            items = list(self.ec2_backend.describe_snapshots(snapshot_ids=[], filters=filters))
        items.sort(key=lambda item: item.id)  # a stable order across pages
        token = self._get_param("NextToken") or ""
        start = int(token[len(_TOKEN_PREFIX):]) if token.startswith(_TOKEN_PREFIX) else 0
        end = start + max_results
        next_token = f"{_TOKEN_PREFIX}{end}" if end < len(items) else None
        return ActionResult({key: items[start:end], "NextToken": next_token})

    return describe


_Ebs.describe_volumes = _paged("volumes", "Volumes", "VolumeIds", 500, _Ebs.describe_volumes)
_Ebs.describe_snapshots = _paged("snapshots", "Snapshots", "SnapshotIds", 1000, _Ebs.describe_snapshots)


# --- 6. CreateVolume ClientToken -------------------------------------------

from moto.ec2.responses.elastic_block_store import ElasticBlockStore  # noqa: E402

_original_create_volume = ElasticBlockStore.create_volume


def _create_volume(self):
    token = self._get_param("ClientToken")
    if not token:
        return _original_create_volume(self)
    backend = self.ec2_backend
    tokens = backend.__dict__.setdefault("_flotilla_volume_tokens", {})
    # Tags are parameters too; only the Region and Availability Zone may differ.
    fingerprint = sorted(
        (k, tuple(v)) for k, v in self.querystring.items()
        if k not in ("ClientToken", "AvailabilityZone", "Action", "Version")
    )
    with _lock:
        known = tokens.get(token)
        if known is not None and known[1] in backend.volumes:
            if known[0] != fingerprint:
                raise IdempotentParameterMismatch()
            return ActionResult(backend.volumes[known[1]])
        result = _original_create_volume(self)
        tokens[token] = (fingerprint, result.result.id)
        return result


ElasticBlockStore.create_volume = _create_volume


# --- 9. AttachVolume refuses a volume or device in use ----------------------
# Checked at the API, not in the backend: moto's own RunInstances attaches
# root volumes through the backend.

from moto.ec2.exceptions import InvalidVolumeAttachmentError, VolumeInUseError  # noqa: E402

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


# --- 1. The SSM agent registers only with an instance profile ----------------
# "With DHMC enabled, you don't need to configure additional resources, such
# as an instance profile, to use your Amazon EC2 instances as managed nodes"
# (cli/latest/reference/ssm/register-default-host-management-configuration):
# without DHMC, which is not emulated, an instance needs a profile. Any
# profile counts here; its role's SSM permissions are not checked.

_GONE = ("shutting-down", "terminated")
_registered = set()  # instance ids whose agent has registered at least once
_started_at = {}  # instance id -> when StartInstances last started it


def _as_utc(value):
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def _agent(ec2, instance, now):
    """The agent's PingStatus, or None if it never registered (then the
    instance is neither listed nor a valid SendCommand target)."""
    if instance.state in _GONE:
        return None
    if instance.id in _impaired():
        return "ConnectionLost" if instance.id in _registered else None
    booted = max([_as_utc(instance.launch_time)] + [t for t in [_started_at.get(instance.id)] if t])
    has_profile = instance.id in ec2.iam_instance_profile_associations
    if instance.state == "running" and has_profile and (now - booted).total_seconds() >= AGENT_SECONDS:
        _registered.add(instance.id)
        return "Online"
    return "ConnectionLost" if instance.id in _registered else None


def _agent_of(ec2, instance_id, now):
    try:
        instance = ec2.get_instance(instance_id)
    except Exception:  # unknown instance
        return None
    return _agent(ec2, instance, now)


# --- 3. SendCommand targets only what it names -----------------------------

_original_targets = Command._get_instance_ids_from_targets


def _instance_ids_from_targets(self):
    if not self.targets:
        return []
    return _original_targets(self)


Command._get_instance_ids_from_targets = _instance_ids_from_targets


# --- 17. EventBridge events: EC2 state changes and Run Command status -------
# moto emits no service events. EC2 sends an "EC2 Instance State-change
# Notification" for each instance's transitions, and SSM an "EC2 Command
# Invocation Status-change Notification" when an invocation changes status,
# to the default event bus; rules route them (tools/local_stack.py creates
# template.yaml's, with their SQS targets, and moto's EventBridge delivers).
# Without rules they go nowhere, as on AWS.

import json  # noqa: E402

from moto.events.models import events_backends  # noqa: E402


def _emit(account_id, region, source, detail_type, detail, resources):
    try:
        events_backends[account_id][region].put_events(
            [{"Source": source, "DetailType": detail_type, "Detail": json.dumps(detail), "Resources": resources}]
        )
    except Exception as error:  # noqa: BLE001 - a lost event only slows a job, as on AWS
        print(f"flotilla_moto: event not delivered: {error}", file=sys.stderr)


def _instance_arn(account_id, region, instance_id):
    return f"arn:aws:ec2:{region}:{account_id}:instance/{instance_id}"


def _state_change(backend, instance_id, *states):
    for state in states:
        _emit(backend.account_id, backend.region_name, "aws.ec2", "EC2 Instance State-change Notification",
              {"instance-id": instance_id, "state": state},
              [_instance_arn(backend.account_id, backend.region_name, instance_id)])


def _invocation_status_change(execution):
    command = execution.command
    account_id, region = command.account_id, command.backend_region
    _emit(account_id, region, "aws.ssm", "EC2 Command Invocation Status-change Notification", {
        "command-id": command.command_id,
        "document-name": command.document_name,
        "instance-id": execution.instance_id,
        "requested-date-time": command.requested_date_time.isoformat(),
        "status": execution.status,
    }, [_instance_arn(account_id, region, execution.instance_id)])


_create_snapshot_quietly = EC2Backend.create_snapshot


def _create_snapshot_announced(self, volume_id, description, owner_id=None, from_ami=None):
    # "The createSnapshot event is sent to your AWS account when an action to
    # create a snapshot completes" (EventBridge for Amazon EBS); moto's
    # snapshots are completed as soon as they exist. An AMI's are not ours.
    snapshot = _create_snapshot_quietly(self, volume_id, description, owner_id, from_ami)
    if from_ami is None:
        region, account = self.region_name, self.account_id
        arn = f"arn:aws:ec2:{region}::snapshot/{snapshot.id}"
        started = _now().strftime("%a %b %d %H:%M:%S UTC %Y")
        snapshot.status = "pending"  # gap 18

        def complete():
            snapshot.status = "completed"
            _emit(account, region, "aws.ec2", "EBS Snapshot Notification", {
                "event": "createSnapshot", "result": "succeeded", "cause": "", "request-id": "",
                "snapshot_id": arn, "source": f"arn:aws:ec2:{region}::volume/{volume_id}",
                "startTime": started, "endTime": _now().strftime("%a %b %d %H:%M:%S UTC %Y"),
            }, [arn])

        timer = threading.Timer(SNAPSHOT_SECONDS, complete)
        timer.daemon = True
        timer.start()
    return snapshot


EC2Backend.create_snapshot = _create_snapshot_announced


# --- 4. Commands really run; 10. they die with their instance --------------

import time  # noqa: E402

from moto.ssm.exceptions import SSMException  # noqa: E402

# The states in which an instance's agent is gone mid-run.
_LOST_STATES = ("stopping", "stopped", "shutting-down", "terminated")
_by_instance = {}  # instance id -> its Executions, across backends


class Execution:
    """One command on one instance."""

    def __init__(self, command, instance_id, deadline, delayed):
        self.command = command
        self.instance_id = instance_id
        # The command's expiry: the last moment SSM waits for the agent.
        self.deadline = deadline
        self.status = "Delayed" if delayed else "InProgress"
        self.details = self.status
        self.response_code = -1
        self.stdout = ""
        self.stderr = ""
        self.started = _now()
        # Reached its agent once: its plugin started (ResponseStartDateTime).
        self.delivered = False
        self.ended = None
        self.process = None
        self.cancelled = False
        self.lost = False  # the instance stopped or terminated under it
        self.generation = 0  # each delivery of it (gap 20)
        self.deliver_by = deadline
        self.stdout_url = ""
        self.stderr_url = ""
        self.lock = threading.Lock()

    def finished(self):
        return self.status not in ("Pending", "InProgress", "Delayed", "Cancelling")

    def finish(self, status, details, code, ended=None):
        """Caller holds self.lock."""
        self.status, self.details, self.response_code = status, details, code
        self.ended = ended or _now()
        _invocation_status_change(self)


def _script(command):
    return "\n".join(command.parameters.get("commands", []))


def _timeout(command):
    values = command.parameters.get("executionTimeout") or ["3600"]
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return 3600


def _kill(process):
    if process is not None and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _expire(execution):
    # "If a command reaches the command expiration limit (total timeout), it
    # changes status to DeliveryTimedOut for all invocations that are
    # currently have status of InProgress, Pending or Delayed." and "If Run
    # Command doesn't receive a document terminal response from SSM Agent, the
    # command invocation is marked as deliveryTimeout."
    # (systems-manager/latest/userguide/monitor-commands.html)
    with execution.lock:
        if execution.finished() or _now() < execution.deadline:
            return
        execution.stdout = execution.stderr = ""  # the agent never reported any
        execution.finish("TimedOut", "DeliveryTimedOut", -1, ended=execution.deadline)
        process = execution.process
    _kill(process)


def _lose(execution):
    # The agent dies with its instance: "If the agent isn't running or
    # available on the instance, the command status remains at In Progress
    # until the agent is available again, or until the execution timeout
    # limit is reached. The status then changes to a terminal state."
    # (monitor-commands.html). The doc names no terminal state for an agent
    # that comes back, so a lost invocation waits for the command's expiry
    # (_expire: DeliveryTimedOut). It is never Success.
    with execution.lock:
        if execution.status != "InProgress" or execution.lost:
            return
        execution.lost = True
        execution.stdout = execution.stderr = ""
        process = execution.process
    _kill(process)


def _instance_gone(instance_id):
    with _lock:
        executions = list(_by_instance.get(instance_id, []))
    for execution in executions:
        _lose(execution)
    _stop_holder(instance_id)  # gap 21: every process in it dies, its devices go


def _settle(execution):
    """Bring an invocation up to date when it is read."""
    if execution.finished():
        return
    command = execution.command
    try:
        state = ec2_backends[command.account_id][command.backend_region].get_instance(execution.instance_id).state
    except Exception:
        state = "terminated"
    if state in _LOST_STATES:
        _lose(execution)
    _expire(execution)


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


def _deliver(execution):
    """Wait until the agent is Online; False if the invocation will not run.
    "Delayed: ... The managed node might not be available because of network
    issues, because the node was stopped, or for similar reasons. The system
    will try to send the command again." (GetCommandInvocation StatusDetails)"""
    command = execution.command
    ec2 = ec2_backends[command.account_id][command.backend_region]
    while True:
        with execution.lock:
            if execution.finished():
                return False
            if execution.cancelled:
                execution.finish("Cancelled", "Cancelled", -1)
                return False
            ping = _agent_of(ec2, execution.instance_id, _now())
            # Past its delivery timeout, a command never delivered never
            # runs: Delayed until it expires (a resumed one was delivered).
            if _now() >= execution.deliver_by and not execution.generation:
                execution.status = execution.details = "Delayed"
                return False
            if ping == "Online":
                if execution.status == "Delayed":
                    execution.started = _now()
                execution.status = execution.details = "InProgress"
                execution.delivered = True
                return True
            execution.status = execution.details = "Delayed"
            execution.lost = False  # not delivered yet: nothing was lost
        if ping is None:
            return False  # the instance is gone: Delayed until the command expires
        if _now() >= execution.deadline:
            _expire(execution)
            return False
        time.sleep(0.5)


def _run(execution):
    try:
        if _deliver(execution):
            _execute(execution)
    except Exception as err:  # surface emulator trouble as a failed invocation
        with execution.lock:
            if execution.finished() or execution.lost:
                return
            execution.stderr += f"[{EMULATOR}] {err}"
            execution.finish("Failed", "Failed", 1)
        _write_output(execution)


def _execute(execution):
    command = execution.command
    script = _script(command)
    if script.startswith(VOLUME_OP_MARKER) and DEVICES_WHY is not None:
        op = script.splitlines()[0][len(VOLUME_OP_MARKER):].strip() or "volume operation"
        mine = re.findall(re.escape(execution.instance_id) + r"\) VOLUME_ID=(vol-[0-9a-f]+)", script)
        mounts = sorted(set(re.findall(r"(?:mkdir -p|umount) (\S+)", script)))
        what = ", ".join(mine) if mine else "this instance's volumes"
        where = ", ".join(mounts) or "their mount points"
        if op == "mount":
            plan = f"would find {what} by NVMe id under /dev/disk/by-id, mkfs.ext4 if blank, mount at {where}"
        else:
            plan = f"would sync and umount {where}"
        with execution.lock:
            if execution.finished() or execution.lost:
                return
            execution.stdout = f"[{EMULATOR}] {op} skipped: no EBS block devices on this machine; {plan}\n"
            execution.finish("Success", "Success", 0)
        _write_output(execution)
        return
    home = os.path.join(SCRATCH, execution.instance_id)
    work = os.path.join(home, "work")
    os.makedirs(work, exist_ok=True)
    env = {
        # The AWS CLI of the venv stands in for the one on Amazon Linux.
        "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "/usr/bin:/bin")
        + ":/usr/local/sbin:/usr/sbin:/sbin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "AWS_SSM_INSTANCE_ID": execution.instance_id,
        "AWS_SSM_REGION_NAME": command.backend_region,
        # The step guard's state, which on EC2 is the instance's own
        # /var/lib/flotilla (it survives a reboot, not the instance).
        "FLOTILLA_STATE_DIR": os.path.join(home, "state"),
        "FLOTILLA_EMULATOR": "1",
    }
    endpoint = os.environ.get("FLOTILLA_EMU_ENDPOINT")
    if endpoint:
        # Gap 15: the instance profile's credentials, pointed at this server.
        env.update({
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": command.backend_region,
        })
    # Gap 21: inside the instance's namespaces, where its volumes are.
    holder = _holder(command.account_id, command.backend_region, execution.instance_id)
    with execution.lock:
        if execution.finished() or execution.lost:
            return
        if execution.cancelled:  # cancelled before it started
            execution.finish("Cancelled", "Cancelled", -1)
            return
        generation = execution.generation
        if holder is None and _store is not None:
            # Not running (stopped under it): its agent is gone, never the host's bash.
            execution.lost = True
            return
        argv = holder.command(work, script) if holder else ["bash", "-c", script]
        execution.process = subprocess.Popen(
            argv,
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    process = execution.process
    # The execution timeout, unless the command expires first.
    limit = min(_timeout(command), max(0.0, (execution.deadline - _now()).total_seconds()))
    out, err, timed_out = _collect(execution, process, limit)
    if timed_out and limit < _timeout(command):
        _expire(execution)
        return
    with execution.lock:
        if execution.finished() or execution.lost or execution.generation != generation:
            return  # lost: it stays InProgress, without output, until it expires
        execution.stdout = out.decode(errors="replace")
        execution.stderr = err.decode(errors="replace")
        if execution.cancelled:
            execution.finish("Cancelled", "Cancelled", -1)
        elif timed_out:
            # "Execution Timed Out: Command execution started on the instance,
            # but the execution wasn't complete before the execution timeout
            # expired." (monitor-commands.html)
            execution.finish("TimedOut", "ExecutionTimedOut", -1)
        else:
            code = process.returncode
            code = code if code >= 0 else 128 - code
            execution.finish("Success" if code == 0 else "Failed", "Success" if code == 0 else "Failed", code)
    _write_output(execution)


def _collect(execution, process, limit):
    """The step's stdout and stderr, read as it writes them; with
    CloudWatchOutputConfig (gap 25) its complete lines are put into the log
    group about every second, and the rest when it ends."""
    chunks = {"stdout": [], "stderr": []}

    def read(name, pipe):
        for block in iter(lambda: pipe.read1(65536), b""):
            chunks[name].append(block)

    readers = [threading.Thread(target=read, args=(name, pipe), daemon=True)
               for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    group = getattr(execution.command, "_flotilla_log_group", None)
    sent = {"stdout": 0, "stderr": 0}

    def upload(final):
        if not group or execution.lost:
            return  # the agent died with its instance: nothing more is sent
        for name in ("stdout", "stderr"):
            data = b"".join(chunks[name])
            end = len(data) if final else data.rfind(b"\n") + 1
            if end > sent[name]:
                lines = data[sent[name]:end].decode(errors="replace").splitlines()
                sent[name] = end
                _put_log_lines(execution, group, name, lines)

    started = time.monotonic()
    timed_out = False
    while True:
        try:
            process.wait(timeout=max(0.0, min(1.0, limit - (time.monotonic() - started))))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - started >= limit:
                _kill(process)
                process.wait()
                timed_out = True
                break
            upload(False)
    for reader in readers:
        reader.join(timeout=5)
    upload(True)
    return b"".join(chunks["stdout"]), b"".join(chunks["stderr"]), timed_out


_logs_lock = threading.Lock()


def _put_log_lines(execution, group, name, lines):
    from moto.logs.models import logs_backends

    command = execution.command
    backend = logs_backends[command.account_id][command.backend_region]
    stream = f"{command.command_id}/{execution.instance_id}/aws-runShellScript/{name}"
    with _logs_lock:
        if group not in backend.groups:
            backend.create_log_group(group, tags={})
        backend.ensure_log_stream(group, stream)
        stamp = int(time.time() * 1000)
        events = [{"timestamp": stamp, "message": line} for line in lines if line]
        if events:
            backend.put_log_events(group, stream, events)


def _executions(backend):
    return backend.__dict__.setdefault("_flotilla_executions", {})


_original_send_command = SimpleSystemManagerBackend.send_command


def _send_command(self, **kwargs):
    log_group = getattr(_request_options, "log_group", None)
    command = _send_command_checked(self, **kwargs)
    command._flotilla_log_group = log_group  # gap 25
    return command


_request_options = threading.local()
_original_send_command_response = SimpleSystemManagerResponse.send_command


def _send_command_response(self):
    # Gap 25: moto's handler drops CloudWatchOutputConfig; keep it for the backend.
    config = self._get_param("CloudWatchOutputConfig") or {}
    enabled = config.get("CloudWatchOutputEnabled") in (True, "true", "True")
    named = config.get("CloudWatchLogGroupName") or f"aws/ssm/{self._get_param('DocumentName')}"
    _request_options.log_group = named if enabled else None
    try:
        return _original_send_command_response(self)
    finally:
        _request_options.log_group = None


SimpleSystemManagerResponse.send_command = _send_command_response


def _send_command_checked(self, **kwargs):
    ec2 = ec2_backends[self.account_id][self.region_name]
    now = _now()
    named = list(kwargs.get("instance_ids") or [])  # moto extends the list it is given
    # InstanceIds: "you can specify up to 50 IDs" (SendCommand API
    # reference); SSM refuses more, misleadingly, as ThrottlingException
    # "Rate exceeded" (boto/botocore#993), before looking at any of them.
    if len(named) > 50:
        raise SSMException("ThrottlingException", "Rate exceeded")
    # InvalidInstanceId: "SSM Agent isn't registered with the SSM endpoint" or
    # "The managed node isn't in a valid state. Valid states are: Running,
    # Pending, Stopped, and Stopping. Invalid states are: Shutting-down and
    # Terminated." (SSM API reference, SendCommand errors); a client error,
    # HTTP 400. The message is SSM's.
    invalid = [instance_id for instance_id in named if _agent_of(ec2, instance_id, now) is None]
    if invalid:
        raise SSMException(
            "InvalidInstanceId", f"Instances [[{', '.join(invalid)}]] not in a valid state for account {self.account_id}"
        )
    command = _original_send_command(self, **kwargs)
    # "This means the command runs for 4,200 seconds (70 minutes) before the
    # system returns a delivery timeout": Timeout (seconds) 600 plus the
    # document's executionTimeout 3600 (monitor-commands.html, timeouts).
    total = datetime.timedelta(seconds=int(command.timeout_seconds) + _timeout(command))
    command.expires_after = command.requested_date_time + total
    executions = _executions(self)
    for instance_id in command.instance_ids:
        ping = _agent_of(ec2, instance_id, now)
        if ping is None and instance_id not in named:
            continue  # Targets match managed nodes only
        execution = Execution(command, instance_id, now + total, delayed=ping != "Online")
        # SendCommand TimeoutSeconds: "If this time is reached and the command
        # hasn't already started running, it won't run."
        execution.deliver_by = now + datetime.timedelta(seconds=int(command.timeout_seconds))
        executions[(command.command_id, instance_id)] = execution
        with _lock:
            _by_instance.setdefault(instance_id, []).append(execution)
        threading.Thread(target=_run, args=(execution,), daemon=True).start()
    return command


SimpleSystemManagerBackend.send_command = _send_command


def _invocation(backend, command, instance_id, details_limit=None):
    execution = _executions(backend).get((command.command_id, instance_id))
    if execution is None:
        return None
    _settle(execution)
    with execution.lock:
        ended = execution.ended or _now()
        elapsed = max(0.0, (ended - execution.started).total_seconds())
        delayed = execution.status == "Delayed"
        body = {
            "CommandId": command.command_id,
            "InstanceId": instance_id,
            "Comment": command.comment,
            "DocumentName": command.document_name,
            "DocumentVersion": "$DEFAULT",
            "PluginName": "aws:runShellScript",
            "ResponseCode": execution.response_code,
            "ExecutionStartDateTime": "" if delayed else execution.started.isoformat(),
            "Delivered": execution.delivered,
            "ExecutionElapsedTime": "" if delayed else f"PT{elapsed:.3f}S",
            "ExecutionEndDateTime": execution.ended.isoformat() if execution.ended else "",
            "Status": execution.status,
            "StatusDetails": execution.details,
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
    body.pop("Delivered")  # ours, for ListCommandInvocations' plugins
    return body


SimpleSystemManagerBackend.get_command_invocation = _get_command_invocation


# --- 10. StopInstances / TerminateInstances take the agent with them --------

_original_stop_instances = EC2Backend.stop_instances
_original_terminate_instances = EC2Backend.terminate_instances
_original_start_instances = EC2Backend.start_instances


def _note_registration(backend, instance_ids):
    # An agent that was Online registered, even if nobody asked before now.
    now = _now()
    for instance_id in instance_ids or []:
        _agent_of(backend, instance_id, now)


def _stop_instances(self, instance_ids):
    _note_registration(self, instance_ids)
    for instance_id in instance_ids or []:
        _instance_gone(instance_id)  # gap 21: nothing of it writes once it is stopped
    stopped = _original_stop_instances(self, instance_ids)
    for instance, previous in stopped:
        _instance_gone(instance.id)
        if previous.name not in ("stopping", "stopped"):
            _state_change(self, instance.id, "stopping", "stopped")
    return stopped


def _terminate_instances(self, instance_ids):
    _note_registration(self, instance_ids)
    for instance_id in instance_ids or []:
        _instance_gone(instance_id)  # before moto detaches its volumes
        _stop_holder(instance_id, gone=True)
    terminated = _original_terminate_instances(self, instance_ids)
    for instance, previous in terminated:
        _instance_gone(instance.id)
        if previous.name not in ("shutting-down", "terminated"):
            _state_change(self, instance.id, "shutting-down", "terminated")
    return terminated


def _start_instances(self, instance_ids):
    started = _original_start_instances(self, instance_ids)
    for instance, previous in started:
        if previous.name != "running":
            _started_at[instance.id] = _now()  # the agent comes Online after boot
            _state_change(self, instance.id, "pending", "running")
            _resume(instance.id)
    return started


def _resume(instance_id):
    # Gap 20: the agent delivers again what the stop interrupted, unless the
    # command expired meanwhile.
    with _lock:
        executions = list(_by_instance.get(instance_id, []))
    for execution in executions:
        with execution.lock:
            if not execution.lost or execution.finished() or _now() >= execution.deadline:
                continue
            execution.lost = False
            execution.process = None
            execution.generation += 1
            execution.status = execution.details = "Delayed"
        threading.Thread(target=_run, args=(execution,), daemon=True).start()


EC2Backend.stop_instances = _stop_instances
EC2Backend.terminate_instances = _terminate_instances
EC2Backend.start_instances = _start_instances


# --- 2. ListCommandInvocations, and CancelCommand --------------------------


def _plugin_output(body):
    # aws:runShellScript's plugin Output: stdout, then stderr after SSM's
    # separator, cut to ListCommandInvocations' 2,500 characters.
    output = body["StandardOutputContent"]
    if body["StandardErrorContent"]:
        output += "\n----------ERROR-------\n" + body["StandardErrorContent"]
    return output[:LIST_OUTPUT_LIMIT]


def list_command_invocations(self):
    from moto.ssm.exceptions import ValidationException

    command_id = self._get_param("CommandId")
    instance_id = self._get_param("InstanceId")
    details = self._get_param("Details", False)
    # ListCommandInvocations pages at most 50 invocations (MaxResults 1-50, default 50).
    max_results = int(self._get_param("MaxResults", 50))
    if not 1 <= max_results <= 50:
        raise ValidationException(
            f"1 validation error detected: Value '{max_results}' at 'maxResults' failed to satisfy constraint: "
            "Member must have value less than or equal to 50 and greater than or equal to 1"
        )
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
                        **({"ResponseStartDateTime": body["ExecutionStartDateTime"]} if body["Delivered"] else {}),
                        "Output": _plugin_output(body),
                        "StandardOutputUrl": body["StandardOutputUrl"],
                        "StandardErrorUrl": body["StandardErrorUrl"],
                    }
                ]
            invocations.append(item)
    token = self._get_param("NextToken") or ""
    start = int(token[len(_TOKEN_PREFIX):]) if token.startswith(_TOKEN_PREFIX) else 0
    end = start + max_results
    page = {"CommandInvocations": invocations[start:end]}
    if end < len(invocations):
        page["NextToken"] = f"{_TOKEN_PREFIX}{end}"
    return ActionResult(page)


def cancel_command(self):
    command_id = self._get_param("CommandId")
    # CancelCommand reference: "InstanceIds: A list of instance IDs on which
    # you want to cancel the command. If not provided, the command is canceled
    # on every instance on which it was requested."
    only = set(self._get_param("InstanceIds") or [])
    backend = self.ssm_backend
    backend.get_command_by_id(command_id)  # InvalidCommandId if unknown
    for (cid, instance_id), execution in list(_executions(backend).items()):
        if cid != command_id or (only and instance_id not in only):
            continue
        with execution.lock:
            if execution.finished():
                continue
            execution.cancelled = True
            if execution.status == "Delayed":  # never delivered: nothing to stop
                execution.finish("Cancelled", "Cancelled", -1)
            process = execution.process
        if not execution.lost:  # a lost invocation's agent never hears of it
            _kill(process)
    return ActionResult({})


SimpleSystemManagerResponse.list_command_invocations = list_command_invocations


# --- 19. ListCommands lags -------------------------------------------------

_original_list_commands = SimpleSystemManagerBackend.list_commands


def _list_lag():
    try:
        with open(os.path.join(SCRATCH, "list-lag")) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return LIST_LAG_SECONDS


def _list_commands(self, command_id, instance_id):
    commands = _original_list_commands(self, command_id, instance_id)
    if command_id:
        return commands
    seen_from = _now() - datetime.timedelta(seconds=_list_lag())
    return [c for c in commands if _as_utc(c.requested_date_time) <= seen_from]


SimpleSystemManagerBackend.list_commands = _list_commands
SimpleSystemManagerResponse.cancel_command = cancel_command


# --- 1. DescribeInstanceInformation ----------------------------------------


def describe_instance_information(self):
    from moto.ssm.exceptions import ValidationException

    # The API model: MaxResults 5-50 (default 10), and at most 100 values in
    # a filter; SSM pages the rest behind a NextToken.
    max_results = int(self._get_param("MaxResults", 10))
    if not 5 <= max_results <= 50:
        raise ValidationException(
            f"1 validation error detected: Value '{max_results}' at 'maxResults' failed to satisfy constraint: "
            "Member must have value less than or equal to 50 and greater than or equal to 5"
        )
    wanted = set()
    lists = [f.get("Values", []) for f in self._get_param("Filters", []) or []]
    lists += [f.get("valueSet", []) for f in self._get_param("InstanceInformationFilterList", []) or []]
    if any(not values for values in lists):
        raise ValidationException(
            "1 validation error detected: Value at 'filters.1.member.values' failed to satisfy constraint: "
            "Member must have length greater than or equal to 1"
        )
    for values in lists:
        if len(values) > 100:
            raise ValidationException(
                "1 validation error detected: Value at 'filters.1.member.values' failed to satisfy constraint: "
                "Member must have length less than or equal to 100"
            )
    for f in self._get_param("Filters", []) or []:
        if f.get("Key") == "InstanceIds":
            wanted.update(f.get("Values", []))
    for f in self._get_param("InstanceInformationFilterList", []) or []:
        if f.get("key") == "InstanceIds":
            wanted.update(f.get("valueSet", []))
    ec2 = ec2_backends[self.current_account][self.region]
    # "If you specify an instance ID that is not valid or an instance that
    # you do not own, you receive an error" (API reference), and
    # InvalidInstanceId names shutting-down and terminated as invalid states.
    # A running instance whose agent has not registered is read as not
    # listed (the reference's error list also names an unregistered agent;
    # the adapter halves a refused lookup either way).
    known = {
        instance.id
        for reservation in ec2.all_reservations()
        for instance in reservation.instances
        if instance.state not in _GONE
    }
    if wanted - known:
        raise SSMException("InvalidInstanceId", "Instance id(s) not valid for this account")
    now = _now()
    items = []
    for reservation in ec2.all_reservations():
        for instance in reservation.instances:
            if wanted and instance.id not in wanted:
                continue
            ping = _agent(ec2, instance, now)
            if ping is None:
                continue  # never registered (no instance profile, or still booting), or gone
            items.append(
                {
                    "InstanceId": instance.id,
                    "PingStatus": ping,
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
    token = self._get_param("NextToken") or ""
    if token and not token.startswith(_AGENT_TOKEN_PREFIX):
        raise SSMException("InvalidNextToken", "The specified token isn't valid.")
    start = int(token[len(_AGENT_TOKEN_PREFIX):]) if token else 0
    end = start + max_results
    page = {"InstanceInformationList": items[start:end]}
    if end < len(items):
        page["NextToken"] = f"{_AGENT_TOKEN_PREFIX}{end}"
    return ActionResult(page)


_AGENT_TOKEN_PREFIX = "flotilla-agents-"
SimpleSystemManagerResponse.describe_instance_information = describe_instance_information


def reset_scratch():
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH, exist_ok=True)


# --- 13. An action refused by IAM, for tests ---------------------------------
# moto does not evaluate IAM. A test lists "<Action>" lines in
# $FLOTILLA_EMU_SCRATCH/refuse; those EC2 actions then fail as EC2 answers an
# IAM denial: UnauthorizedOperation, HTTP 403 ("You are not authorized to
# perform this operation.", EC2 API error codes).


class UnauthorizedOperation(EC2ClientError):
    http_status = 403

    def __init__(self):
        super().__init__("UnauthorizedOperation", "You are not authorized to perform this operation.")


def _refused(action):
    try:
        with open(os.path.join(SCRATCH, "refuse")) as f:
            return action in {line.strip() for line in f}
    except OSError:
        return False


from moto.ec2.responses.elastic_block_store import ElasticBlockStore  # noqa: E402

_original_delete_volume_response = ElasticBlockStore.delete_volume


def _delete_volume_response(self):
    # The API call only: moto's own backend start-up deletes volumes too.
    if _refused("DeleteVolume"):
        err = UnauthorizedOperation()
        status, headers, body = self.serialized(ActionResult(err))
        headers["status"] = err.http_status
        return body, headers
    return _original_delete_volume_response(self)


ElasticBlockStore.delete_volume = _delete_volume_response


# --- 14. Failed status checks, for tests ------------------------------------
# moto's InstanceStatus and SystemStatus are always "ok". EC2 reports a failed
# instance status check as Status "impaired" with a reachability detail
# "failed" and ImpairedSince (DescribeInstanceStatus, InstanceStatusSummary).

from moto.ec2.models.instances import Instance  # noqa: E402

_impaired_since = {}


def _impaired():
    try:
        with open(os.path.join(SCRATCH, "impaired")) as f:
            return {line.strip() for line in f if line.strip()}
    except OSError:
        return set()


_original_instance_status = Instance.instance_status


def _instance_status(self):
    status = _original_instance_status.fget(self)
    if self.state_code != 16 or self.id not in _impaired():
        return status
    since = _impaired_since.setdefault(self.id, _now())
    return {
        "Details": [{"Name": "reachability", "Status": "failed", "ImpairedSince": since}],
        "Status": "impaired",
    }


Instance.instance_status = property(_instance_status)


# --- 21. Real block devices (see flotilla_devices.py) -----------------------

import flotilla_devices  # noqa: E402

DEVICES_WHY = flotilla_devices.reason()
_store = None  # the EBS store, made by start_devices()
_holders = {}  # instance id -> Holder, while the instance runs
_api_attached = {}  # volume id -> instance id: data volumes attached through the API
_devices_lock = threading.Lock()


def start_devices():
    """Called by moto_server.py in the server's own mount namespace."""
    global _store
    if DEVICES_WHY is None:
        flotilla_devices.sweep(SCRATCH)
        _store = flotilla_devices.Store(SCRATCH)


class VolumeLimitExceeded(EC2ClientError):
    def __init__(self):
        super().__init__("VolumeLimitExceeded", "You have reached the limit on your Amazon EBS volume storage "
                         f"(this emulator holds at most {flotilla_devices.BUDGET_BYTES >> 20} MiB).")


class SnapshotLimitExceeded(EC2ClientError):
    def __init__(self):
        super().__init__("SnapshotLimitExceeded", "You have reached the limit on your Amazon EBS snapshot storage "
                         f"(this emulator holds at most {flotilla_devices.BUDGET_BYTES >> 20} MiB).")


def _holder(account_id, region, instance_id):
    """The running instance's holder, started on first use; None without
    real devices, or when the instance is not running."""
    if _store is None:
        return None
    backend = ec2_backends[account_id][region]
    with _devices_lock:
        holder = _holders.get(instance_id)
        if holder is not None and holder.process.poll() is None:
            return holder
        try:
            if backend.get_instance(instance_id).state != "running":
                return None
        except Exception:
            return None
        home = os.path.join(SCRATCH, instance_id)
        holder = flotilla_devices.Holder(instance_id, home, os.path.join(SCRATCH, ".ns", instance_id), SCRATCH)
        _holders[instance_id] = holder
        # A start after a stop: EBS volumes stayed attached, their devices come back.
        for volume_id, owner in list(_api_attached.items()):
            volume = backend.volumes.get(volume_id)
            attached = volume is not None and volume.attachment is not None
            if owner == instance_id and attached and volume.attachment.instance.id == instance_id:
                _store.blank(volume_id, backend.volumes[volume_id].size)
                holder.attach(volume_id, _store.path(volume_id))
        return holder


def _stop_holder(instance_id, gone=False):
    with _devices_lock:
        holder = _holders.pop(instance_id, None)
    if holder is not None:
        holder.kill()
    if gone and _store is not None:  # terminated: its root goes too
        shutil.rmtree(os.path.join(SCRATCH, ".ns", instance_id), ignore_errors=True)


_quiet_create_volume = EC2Backend.create_volume


def _create_volume_with_bytes(self, size, zone_name, snapshot_id=None, *args, **kwargs):
    volume = _quiet_create_volume(self, size, zone_name, snapshot_id, *args, **kwargs)
    if _store is not None and snapshot_id:
        _store.clone(snapshot_id, volume.id, size)  # an AMI's snapshot has no bytes here
    return volume


EC2Backend.create_volume = _create_volume_with_bytes

_token_create_volume = ElasticBlockStore.create_volume


def _create_volume_in_budget(self):
    token = self._get_param("ClientToken")
    known = token and token in self.ec2_backend.__dict__.get("_flotilla_volume_tokens", {})
    if _store is not None and not known and _store.over_budget():  # a retried create gets its volume
        raise VolumeLimitExceeded()
    return _token_create_volume(self)


ElasticBlockStore.create_volume = _create_volume_in_budget

_announced_create_snapshot = EC2Backend.create_snapshot


def _create_snapshot_with_bytes(self, volume_id, description, owner_id=None, from_ami=None):
    if _store is None or from_ami is not None:
        return _announced_create_snapshot(self, volume_id, description, owner_id, from_ami)
    if _store.over_budget():
        raise SnapshotLimitExceeded()
    self.get_volume(volume_id)  # InvalidVolume.NotFound first
    aside = _store.clone_aside(volume_id)  # the point in time (flotilla_devices); a failure fails the call
    snapshot = _announced_create_snapshot(self, volume_id, description, owner_id, from_ami)
    if aside is not None:
        _store.adopt(aside, snapshot.id)
    return snapshot


EC2Backend.create_snapshot = _create_snapshot_with_bytes

_quiet_delete_volume = EC2Backend.delete_volume
_quiet_delete_snapshot = EC2Backend.delete_snapshot


def _delete_volume_and_bytes(self, volume_id):
    volume = _quiet_delete_volume(self, volume_id)
    if _store is not None:
        _store.remove(volume_id)
    _api_attached.pop(volume_id, None)
    return volume


def _delete_snapshot_and_bytes(self, snapshot_id):
    snapshot = _quiet_delete_snapshot(self, snapshot_id)
    if _store is not None:
        _store.remove(snapshot_id)
    return snapshot


EC2Backend.delete_volume = _delete_volume_and_bytes
EC2Backend.delete_snapshot = _delete_snapshot_and_bytes

_checked_attach_volume = ElasticBlockStore.attach_volume


def _attach_volume_device(self):
    result = _checked_attach_volume(self)
    if _store is not None:
        volume_id, instance_id = self._get_param("VolumeId"), self._get_param("InstanceId")
        backend = self.ec2_backend
        _store.blank(volume_id, backend.volumes[volume_id].size)
        _api_attached[volume_id] = instance_id
        with _devices_lock:
            holder = _holders.get(instance_id)
        if holder is not None and holder.process.poll() is None:
            holder.attach(volume_id, _store.path(volume_id))
        # else: the device appears when the instance's holder starts
    return result


ElasticBlockStore.attach_volume = _attach_volume_device

_original_detach_volume = ElasticBlockStore.detach_volume


def _detach_volume_device(self):
    """"If the volume is mounted ... the volume can become stuck in the busy
    state while detaching ... until you unmount the volume, force
    detachment, reboot the instance, or all three" (DetachVolume): here it
    stays attached, its attachment `busy`, until the instance unmounts it,
    stops or terminates; then it detaches."""
    volume_id = self._get_param("VolumeId")
    force = str(self._get_param("Force", "false")).lower() == "true"
    volume = self.ec2_backend.get_volume(volume_id)
    if volume.attachment is None:
        raise InvalidVolumeAttachmentError(volume_id, self._get_param("InstanceId") or "any instance")
    named = self._get_param("InstanceId")
    if named and named != volume.attachment.instance.id:
        raise InvalidVolumeAttachmentError(volume_id, named)
    if not named:
        # InstanceId is optional (DetachVolume reference); moto needs it.
        self.querystring["InstanceId"] = [volume.attachment.instance.id]
        if isinstance(getattr(self, "params", None), dict):
            self.params["InstanceId"] = volume.attachment.instance.id
    instance_id = _api_attached.get(volume_id)
    with _devices_lock:
        holder = _holders.get(instance_id) if instance_id else None
    if _store is None or holder is None or holder.process.poll() is not None:
        if _store is not None:
            _api_attached.pop(volume_id, None)
        return _original_detach_volume(self)
    answer = holder.detach(volume_id, force)
    if answer.get("ok"):
        _api_attached.pop(volume_id, None)
        result = _original_detach_volume(self)
        _store.sever(volume_id)  # a forced detach: the instance writes on, not to the volume
        return result
    if not answer.get("mounted"):
        raise EC2ClientError("IncorrectState", f"Volume {volume_id} could not be detached: {answer.get('error')}")
    backend = self.ec2_backend
    attachment = backend.volumes[volume_id].attachment
    attachment.status = "busy"
    threading.Thread(target=_detach_when_unmounted, args=(backend, volume_id, instance_id, attachment),
                     daemon=True).start()
    return ActionResult({"VolumeId": volume_id, "InstanceId": instance_id, "Device": attachment.device,
                         "State": "detaching", "AttachTime": attachment.attach_time})


def _detach_when_unmounted(backend, volume_id, instance_id, attachment):
    while True:
        time.sleep(0.5)
        with _devices_lock:
            holder = _holders.get(instance_id)
        volume = backend.volumes.get(volume_id)
        if volume is None or volume.attachment is not attachment:
            return  # detached (forced, or with its instance) and maybe attached again since
        try:
            running = holder is not None and holder.process.poll() is None
            if running and not holder.detach(volume_id).get("ok"):
                continue
        except OSError:
            pass
        if _api_attached.get(volume_id) == instance_id:
            _api_attached.pop(volume_id, None)
        try:
            backend.detach_volume(volume_id, instance_id, None)
        except Exception:  # noqa: BLE001 - already detached
            pass
        _store.sever(volume_id)
        return


ElasticBlockStore.detach_volume = _detach_volume_device


# --- gap 22: Step Functions task tokens --------------------------------------

import json  # noqa: E402

from moto.core.exceptions import AWSError  # noqa: E402
from moto.stepfunctions.models import StepFunctionBackend  # noqa: E402


class TaskTimedOut(AWSError):
    TYPE = "TaskTimedOut"
    STATUS = 400


class TaskDoesNotExist(AWSError):
    TYPE = "TaskDoesNotExist"
    STATUS = 400


class InvalidOutput(AWSError):
    TYPE = "InvalidOutput"
    STATUS = 400


_closed_tasks = set()
_tasks_lock = threading.Lock()


def _lines(name):
    try:
        with open(os.path.join(SCRATCH, name)) as f:
            return {line.strip() for line in f if line.strip()}
    except OSError:
        return set()


def _task_call(action, token, closes, **fields):
    with _tasks_lock:
        if token in _closed_tasks or token in _lines("sfn-timed-out"):
            raise TaskTimedOut("The task token has either expired or the task associated with the token has already been closed.")
        if token not in _lines("sfn-open"):
            raise TaskDoesNotExist("Task does not exist")
        if closes:
            _closed_tasks.add(token)
        os.makedirs(SCRATCH, exist_ok=True)
        with open(os.path.join(SCRATCH, "sfn-calls.jsonl"), "a") as f:
            f.write(json.dumps({"action": action, "token": token, **fields}) + "\n")


def _send_task_success(self, task_token, outcome):
    if len((outcome or "").encode()) > 262144:
        raise InvalidOutput("Output exceeds the 262144-byte limit")
    _task_call("SendTaskSuccess", task_token, True, output=json.loads(outcome))


def _send_task_failure(self, task_token, error=None):
    _task_call("SendTaskFailure", task_token, True, error=error)


def _send_task_heartbeat(self, task_token):
    _task_call("SendTaskHeartbeat", task_token, False)


StepFunctionBackend.send_task_success = _send_task_success
StepFunctionBackend.send_task_failure = _send_task_failure
StepFunctionBackend.send_task_heartbeat = _send_task_heartbeat


# --- gap 23: PutEvents entries that fail inside a successful call -----------

from moto.events.models import EventsBackend  # noqa: E402

_original_put_events = EventsBackend.put_events


def _failures_to_inject(wanted):
    """How many of the next `wanted` entries fail, and with which code:
    the file holds "N" (InternalFailure) or "N CODE"."""
    path = os.path.join(SCRATCH, "put-events-fail")
    with _tasks_lock:
        try:
            with open(path) as f:
                words = f.read().split()
            left, code = int(words[0]), (words[1] if len(words) > 1 else "InternalFailure")
        except (OSError, ValueError, IndexError):
            return 0, None
        taken = min(left, wanted)
        if taken:
            with open(path, "w") as f:
                f.write(f"{left - taken} {code}")
        return taken, code


def _put_events(self, events):
    failing, code = _failures_to_inject(len(events))
    entries = [{"ErrorCode": code, "ErrorMessage": "injected: the entry was not put"}
               for _ in range(failing)]
    return entries + _original_put_events(self, events[failing:]) if failing < len(events) else entries


EventsBackend.put_events = _put_events


# --- gap 24: spot price history --------------------------------------------

from moto.ec2.responses.spot_instances import SpotInstances as _SpotInstances  # noqa: E402


def _spot_history_rows():
    rows = []
    try:
        with open(os.path.join(SCRATCH, "spot-prices")) as f:
            for line in f:
                words = line.split()
                if len(words) == 4:
                    rows.append((words[0], words[1], words[2], float(words[3])))
    except (OSError, ValueError):
        return []
    return rows


def _describe_spot_price_history(self):
    now = _now()
    start = _as_utc(self._get_param("StartTime")) if self._get_param("StartTime") else None
    end = _as_utc(self._get_param("EndTime")) if self._get_param("EndTime") else now
    types = set(self._get_param("InstanceTypes", []))
    products = set(self._get_param("ProductDescriptions", []))
    if products and not products & {"Linux/UNIX", "Linux/UNIX (Amazon VPC)"}:
        return ActionResult({"SpotPriceHistory": []})
    stamped = [(t, zone, price, now - datetime.timedelta(hours=hours)) for t, zone, price, hours in _spot_history_rows()
               if not types or t in types]
    inside = [r for r in stamped if r[3] <= end and (start is None or r[3] >= start)]
    before = {}
    for r in stamped:
        if start is not None and r[3] < start:
            key = (r[0], r[1])
            if key not in before or r[3] > before[key][3]:
                before[key] = r
    rows = sorted(inside + list(before.values()), key=lambda r: r[3], reverse=True)
    history = [{"InstanceType": t, "ProductDescription": "Linux/UNIX", "SpotPrice": price,
                "AvailabilityZone": zone, "Timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.000Z")}
               for t, zone, price, stamp in rows]
    return ActionResult({"SpotPriceHistory": history})


_SpotInstances.describe_spot_price_history = _describe_spot_price_history
