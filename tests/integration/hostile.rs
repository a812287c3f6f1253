//! The hostile-spec corpus: every string field × every nasty payload, and
//! structural abuse (malformed JSON, wrong types, unknown fields, absurd
//! numbers, oversize bodies). Each goes through intake (on the simulated
//! cloud, so it is fast) and must end REJECTED with a reason that names the
//! field, create nothing, and leave nothing to retry.

use serde_json::{json, Value};

use flotilla_shared::intake::{self, Intake};
use flotilla_shared::record::JobState;
use flotilla_testkit::fake::FakeCloud;
use flotilla_testkit::sim;

fn base(id: &str) -> Value {
    json!({
        "id": id,
        "fleet": {"count": 2},
        "instance_types": ["t3.micro"],
        "image": "ami-0abc1234",
        "tags": {"team": "x"},
        "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data"}],
        "env": {"GREETING": "hi"},
        "run": {"commands": [["echo", "hi"]], "timeout_seconds": 60},
        "retry": {"attempts": 2, "evaluate_on_exit": [{"on_exit_code": "137", "on_reason": "CommandFailed", "action": "RETRY"}]},
        "deadline_minutes": 30
    })
}

/// (field as the reason names it, how to put a payload there)
type Setter = fn(&mut Value, &str);

fn fields() -> Vec<(&'static str, Setter)> {
    vec![
        ("name", |s, p| s["name"] = json!(p)),
        ("instance_types[0]", |s, p| s["instance_types"] = json!([p])),
        ("image", |s, p| s["image"] = json!(p)),
        ("subnet_ids[0]", |s, p| s["subnet_ids"] = json!([p])),
        ("security_group_ids[0]", |s, p| s["security_group_ids"] = json!([p])),
        ("instance_profile", |s, p| s["instance_profile"] = json!(p)),
        ("launch_template", |s, p| s["launch_template"] = json!({"name": p})),
        ("tags: key", |s, p| s["tags"] = json!({p: "x"})),
        ("tags.team", |s, p| s["tags"] = json!({"team": p})),
        ("volumes[0].name", |s, p| s["volumes"][0]["name"] = json!(p)),
        ("volumes[0].device", |s, p| s["volumes"][0]["device"] = json!(p)),
        ("volumes[0].mount_point", |s, p| s["volumes"][0]["mount_point"] = json!(p)),
        ("volumes[0].source.snapshot_id", |s, p| s["volumes"][0]["source"] = json!({"snapshot_id": p})),
        ("volumes[0].source.volume_id", |s, p| s["volumes"][0]["source"] = json!({"volume_id": p})),
        ("env: `", |s, p| s["env"] = json!({p: "x"})),
        ("env.GREETING", |s, p| s["env"] = json!({"GREETING": p})),
        ("run.commands[0][0]", |s, p| s["run"]["commands"] = json!([[p]])),
        ("run.commands[0][1]", |s, p| s["run"]["commands"] = json!([["echo", p]])),
        ("run.script", |s, p| s["run"] = json!({"script": format!("echo {p}"), "timeout_seconds": 60})),
        ("role_arn", |s, p| s["role_arn"] = json!(p)),
        ("external_id", |s, p| {
            s["role_arn"] = json!("arn:aws:iam::123456789012:role/flotilla-target-a");
            s["external_id"] = json!(p);
        }),
        ("on_reason", |s, p| s["retry"]["evaluate_on_exit"][0]["on_reason"] = json!(p)),
        ("on_exit_code", |s, p| s["retry"]["evaluate_on_exit"][0]["on_exit_code"] = json!(p)),
        ("work.list[0]", |s, p| s["work"] = json!({"list": [p, "item-2"]})),
        ("work.s3_prefix", |s, p| s["work"] = json!({"s3_prefix": format!("s3://render-inputs/{p}")})),
    ]
}

const PAYLOADS: [(&str, &str); 14] = [
    ("semicolon", "x;reboot"),
    ("subshell", "$(reboot)"),
    ("backtick", "`id`"),
    ("single quote", "x'y"),
    ("double quote", "x\"y"),
    ("pipe", "x|sh"),
    ("and", "x&&y"),
    ("newline", "x\ny"),
    ("NUL", "x\u{0}y"),
    ("bidi override", "x\u{202e}y"),
    ("zero width", "x\u{200b}y"),
    ("homoglyph", "t\u{0435}am"),
    ("traversal", "../../etc/passwd"),
    ("empty", ""),
];

/// Where a payload is legitimately fine: free text is quoted by Flotilla (or
/// is the user's own script), so shell syntax there is data, not injection;
/// visible non-ASCII letters are data too. Invisible and control characters
/// never are.
fn allowed(field: &str, payload: &str) -> bool {
    let free_text = ["env.GREETING", "run.commands[0][1]", "run.script"];
    let shell_syntax = [
        "semicolon",
        "subshell",
        "backtick",
        "single quote",
        "double quote",
        "pipe",
        "and",
        "traversal",
        "homoglyph",
        "empty",
    ];
    if free_text.contains(&field) && shell_syntax.contains(&payload) {
        return true;
    }
    // Work items are data: written to manifests, read with `read -r`, never
    // put in a script; an S3 key may hold any of these, and an item must
    // have at least one byte.
    if field == "work.s3_prefix" && shell_syntax.contains(&payload) {
        return true;
    }
    if field == "work.list[0]" && shell_syntax.contains(&payload) && payload != "empty" {
        return true;
    }
    // A script may hold newlines.
    if field == "run.script" && payload == "newline" {
        return true;
    }
    // Valid as AWS defines them, and never interpolated into a shell: STS
    // allows [\w+=,.@:/-] in an external id, EC2 `.` and `/` in launch
    // template names and tag keys; a program path with `..` only names a file.
    if payload == "traversal" && ["external_id", "launch_template", "tags: key", "run.commands[0][0]"].contains(&field)
    {
        return true;
    }
    // Tag values: letters (any script), digits, spaces and _.:/=+-@.
    field == "tags.team" && matches!(payload, "homoglyph" | "traversal" | "empty")
}

fn structural() -> Vec<(String, &'static str)> {
    let with = |path: &[&str], value: Value| {
        let mut spec = base("structural");
        let mut cursor = &mut spec;
        for key in &path[..path.len() - 1] {
            cursor = cursor.get_mut(*key).expect("path");
        }
        cursor[path[path.len() - 1]] = value;
        spec.to_string()
    };
    let mut cases: Vec<(String, &'static str)> = vec![
        (r#"{"id": "x", "fleet": "#.into(), "malformed JSON"),
        ("[]".into(), "expected struct JobSpec"),
        ("null".into(), "invalid type"),
        ("\"a job\"".into(), "invalid type"),
        ("{}".into(), "missing field"),
        (with(&["colour"], json!("red")), "unknown field `colour`"),
        (with(&["fleet"], json!({"count": 2, "extra": 1})), "fleet"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 1}, "old": 1}, "device": "/dev/sdf", "mount_point": "/d"}])), "volumes[0].source"),
        (with(&["deadline_minutes"], json!("soon")), "deadline_minutes: invalid type"),
        (with(&["deadline_minutes"], json!(-5)), "deadline_minutes"),
        (with(&["deadline_minutes"], json!(0)), "deadline_minutes: must be"),
        (with(&["deadline_minutes"], json!(10_000_000)), "deadline_minutes: must be"),
        (with(&["deadline_minutes"], json!(1.5)), "deadline_minutes"),
        (with(&["fleet"], json!({"count": 0})), "fleet.count: must be"),
        (with(&["fleet"], json!({"count": -1})), "fleet"),
        (with(&["fleet"], json!({"count": 5_000_000})), "fleet.count: must be"),
        (with(&["fleet"], json!({"count": 18_446_744_073_709_551_615_u64})), "fleet"),
        (with(&["fleet"], json!({"count": "2"})), "fleet"),
        (with(&["fleet"], json!({"items": 0, "items_per_instance_minute": 1, "within_minutes": 1, "max_instances": 1})), "fleet.items"),
        (with(&["fleet"], json!({"items": 10, "items_per_instance_minute": -1, "within_minutes": 1, "max_instances": 1})), "fleet.items_per_instance_minute"),
        (with(&["fleet"], json!({"items": 10, "items_per_instance_minute": 1, "within_minutes": 0, "max_instances": 1})), "fleet.within_minutes"),
        (with(&["fleet"], json!({"items": 1_000_000, "items_per_instance_minute": 1, "within_minutes": 1, "max_instances": 10})), "above max_instances"),
        (with(&["instance_types"], json!([])), "instance_types: at least one"),
        (with(&["instance_types"], json!("t3.micro")), "instance_types"),
        (with(&["run"], json!({"commands": [["echo"]], "timeout_seconds": 0})), "run.timeout_seconds: must be"),
        (with(&["run"], json!({"commands": [["echo"]], "timeout_seconds": 999_999_999})), "run.timeout_seconds: must be"),
        (with(&["run"], json!({"commands": []})), "run: give"),
        // Longer than the whole job (deadline_minutes 30): never valid.
        (with(&["run"], json!({"commands": [["echo"]], "timeout_seconds": 1801})), "run.timeout_seconds: 1801 s is longer than the job's deadline (1800 s)"),
        (with(&["setup"], json!({"commands": [["echo"]], "timeout_seconds": 3600})), "setup.timeout_seconds: 3600 s is longer"),
        (with(&["before_unmount"], json!({"commands": [["echo"]], "timeout_seconds": 86_400})), "before_unmount.timeout_seconds: 86400 s is longer"),
        // Secrets by reference, of the wrong shape.
        (with(&["env"], json!({"DB": {"from_ssm": "no-leading-slash"}})), "env.DB.from_ssm: `no-leading-slash` is not a parameter path"),
        (with(&["env"], json!({"DB": {"from_ssm": "/a//b"}})), "env.DB.from_ssm"),
        (with(&["env"], json!({"DB": {"from_ssm": "/a/b;reboot"}})), "env.DB.from_ssm: character `;`"),
        (with(&["env"], json!({"DB": {"from_ssm": "/a/$(id)"}})), "env.DB.from_ssm: character `$`"),
        (with(&["env"], json!({"DB": {"from_secrets_manager": "arn:aws:s3:::bucket/key"}})), "env.DB.from_secrets_manager: `arn:aws:s3:::bucket/key` is not a secret ARN"),
        (with(&["env"], json!({"DB": {"from_secrets_manager": "arn:aws:secretsmanager:us-east-1:123:secret:x"}})), "env.DB.from_secrets_manager"),
        (with(&["env"], json!({"DB": {"from_vault": "/x"}})), "env.DB: expected a string"),
        (with(&["env"], json!({"DB": {"from_ssm": "/x", "from_secrets_manager": "y"}})), "env.DB: expected a string"),
        (with(&["env"], json!({"DB": 42})), "env.DB: expected a string"),
        (with(&["run"], json!({"commands": [[]]})), "run.commands[0]: empty argv"),
        (with(&["run"], json!({"commands": [["echo"]], "script": "echo"})), "run: give `commands` or `script`, not both"),
        (with(&["run"], json!({"script": "   "})), "run.script: is empty"),
        (with(&["run"], json!({"script": "x".repeat(60_000)})), "run.script: 60000 bytes"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 0}}, "device": "/dev/sdf", "mount_point": "/d"}])), "size_gib: must be"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 99_999}}, "device": "/dev/sdf", "mount_point": "/d"}])), "size_gib: must be"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 1, "volume_type": "gp9"}}, "device": "/dev/sdf", "mount_point": "/d"}])), "volume_type: unknown"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/d", "retention": {"keep_last": 0}}])), "keep_last: must be at least 1"),
        (with(&["volumes"], json!((0..12).map(|i| json!({"name": format!("v{i}"), "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": format!("/d{i}")})).collect::<Vec<_>>())), "volumes: at most 11"),
        (with(&["volumes"], json!([{"name": "d", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/d"}, {"name": "d", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg", "mount_point": "/e"}])), "used twice"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/a"}, {"name": "b", "source": {"new": {"size_gib": 1}}, "device": "/dev/xvdf", "mount_point": "/b"}])), "same device"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/var/lib/amazon/ssm"}])), "system directory"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/usr/bin"}])), "system directory"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "//data"}])), "empty parts"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/d"}, {"name": "b", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg", "mount_point": "/d/e"}])), "overlaps"),
        (with(&["volumes"], json!([{"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/d", "on_retry": "restore"}])), "on_retry"),
        (with(&["image"], json!("ami-0")), "image"),
        (with(&["image"], json!("ami-0123456789abcdef01")), "image"),
        (with(&["image"], json!("ami-0ABC1234")), "image"),
        (with(&["subnet_ids"], json!(["subnet-12345"])), "subnet_ids[0]"),
        (with(&["role_arn"], json!("arn:aws:iam::12345:role/x")), "role_arn"),
        (with(&["role_arn"], json!("arn:aws-mars:iam::123456789012:role/x")), "role_arn"),
        (with(&["role_arn"], json!("arn:aws:iam::123456789012:user/x")), "role_arn"),
        (with(&["external_id"], json!("ab")), "external_id: only meaningful with role_arn"),
        (with(&["tags"], json!({"AWS:owner": "x"})), "tags: key"),
        (with(&["tags"], json!({"flotilla:job-id": "x"})), "tags: key"),
        (with(&["tags"], json!((0..41).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>())), "tags: at most"),
        (with(&["tags"], json!((0..36).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>())), "tags: at most 35 tags, got 36"),
        (with(&["tags"], json!({"team": "x".repeat(300)})), "tags.team: value longer"),
        (with(&["env"], json!({"UID": "0"})), "env.UID"),
        (with(&["env"], json!({"FLOTILLA_JOB_ID": "x"})), "env.FLOTILLA_JOB_ID"),
        (with(&["env"], json!({"BIG": "x".repeat(20_000)})), "env: 20003 bytes"),
        (with(&["retry"], json!({"attempts": 0})), "retry.attempts"),
        (with(&["retry"], json!({"attempts": 11})), "retry.attempts"),
        (with(&["retry"], json!({"attempt_timeout_seconds": 5})), "retry.attempt_timeout_seconds"),
        (with(&["retry"], json!({"evaluate_on_exit": [{"action": "RETRY"}]})), "give on_exit_code or on_reason"),
        (with(&["on_demand_fallback"], json!(true)), "on_demand_fallback"),
        (with(&["market"], json!("free")), "market"),
        (with(&["launch_template"], json!({"id": "lt-0123abcd", "name": "both"})), "launch_template"),
        (with(&["launch_template"], json!({"id": "lt-0123abcd", "version": "latest; rm"})), "launch_template.version"),
        // Work items and the budget.
        (with(&["work"], json!({"list": []})), "work.list: must hold 1..=100000 items, got 0"),
        (with(&["work"], json!({"list": ["x".repeat(1025)]})), "work.list[0]: must be 1-1024 bytes"),
        (with(&["work"], json!({"list": [7]})), "work"),
        (with(&["work"], json!({"list": ["a"], "s3_prefix": "s3://render-inputs/x/"})), "work"),
        (with(&["work"], json!({"s3_prefix": "render-inputs/x/"})), "work.s3_prefix: expected s3://bucket/prefix"),
        (with(&["work"], json!({"s3_prefix": "s3://Render_Inputs/x/"})), "work.s3_prefix: `Render_Inputs` is not an S3 bucket name"),
        (with(&["work"], json!({"s3_prefix": format!("s3://render-inputs/{}", "x".repeat(1025))})), "work.s3_prefix: the prefix is longer"),
        (with(&["work"], json!("s3://render-inputs/x/")), "work"),
        (with(&["fleet"], json!({"items": 10, "items_per_instance_minute": 1, "within_minutes": 10, "max_instances": 2})).replacen('{', r#"{"work": {"list": ["a"]},"#, 1), "fleet.items: omit it when `work` gives the items"),
        (with(&["fleet"], json!({"items_per_instance_minute": 1, "within_minutes": 10, "max_instances": 2})), "fleet.items: required unless `work` gives the items"),
        (with(&["budget_usd"], json!(0)), "budget_usd: must be a positive number"),
        (with(&["budget_usd"], json!(-3.5)), "budget_usd: must be a positive number"),
        (with(&["budget_usd"], json!("ten dollars")), "budget_usd: invalid type"),
        (with(&["budget_usd"], json!(0.0001)), "budget_usd: the estimate is $"),
    ];
    // Bodies over SQS's 256 KiB (only `cargo lambda invoke` could carry them),
    // and one just under whose fields are each too big.
    let over = format!("{{\"id\": \"huge\", \"pad\": \"{}\"}}", "x".repeat(262_200));
    cases.push((over, "at most 262144"));
    let mut under = base("nearly-huge");
    under["run"] = json!({"script": "x".repeat(200_000)});
    let under = under.to_string();
    assert!(under.len() < 256 * 1024);
    cases.push((under, "run.script: 200000 bytes"));
    cases
}

#[tokio::test]
async fn two_hundred_hostile_specs_are_rejected_with_the_field_named_and_nothing_created() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    let cases = corpus();
    let mut failures = Vec::new();
    for (id, body, expected) in &cases {
        let delivery = id.strip_prefix("job-").unwrap_or(id);
        let outcome = intake::submit(&ports, body, delivery, None).await.expect("intake never fails on bad input");
        let (job_id, reason) = match &outcome {
            Intake::Rejected { job_id, reason } => (job_id.clone(), reason.clone()),
            other => {
                failures.push(format!("{id}: {other:?} for {}", body.chars().take(200).collect::<String>()));
                continue;
            }
        };
        if !reason.contains(expected.as_str()) {
            failures.push(format!("{id}: reason `{reason}` does not name `{expected}`"));
        }
        let record = cloud.record(&job_id).expect("a REJECTED record");
        assert_eq!(record.state, JobState::Rejected);
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // Nothing was created, and nothing waits to be retried.
    let state = cloud.lock();
    assert!(state.instances.is_empty() && state.volumes.is_empty() && state.snapshots.is_empty());
    assert!(state.queue.is_empty(), "a rejection never wakes the reconciler");
    let calls: Vec<&&str> = state.calls.keys().filter(|k| !["GetObject", "PutObject"].contains(k)).collect();
    assert!(calls.is_empty(), "only the record was written: {calls:?}");
    println!("hostile corpus: {} specs, all REJECTED with the field named", cases.len());
}

/// (id, body, what the reason must name)
fn corpus() -> Vec<(String, String, String)> {
    let mut cases: Vec<(String, String, String)> = Vec::new();
    for (f, (field, set)) in fields().into_iter().enumerate() {
        for (p, (kind, payload)) in PAYLOADS.iter().enumerate() {
            if allowed(field, kind) {
                continue;
            }
            let id = format!("h-{f}-{p}");
            let mut spec = base(&id);
            set(&mut spec, payload);
            cases.push((id, spec.to_string(), field.to_string()));
        }
    }
    for (i, (body, expected)) in structural().into_iter().enumerate() {
        // Each its own id (a rejection claims the id it names).
        let body = body.replacen("\"id\":\"structural\"", &format!("\"id\":\"s-{i}\""), 1);
        cases.push((format!("job-s{i}"), body, expected.to_string()));
    }
    assert!(cases.len() >= 200, "the corpus has {} specs", cases.len());
    cases
}

/// The same corpus as dry runs: the reply names the field as a submission's
/// reason would, and a dry run writes nothing at all, not even a record.
#[tokio::test]
async fn hostile_dry_runs_are_rejected_with_the_field_named_and_write_nothing() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    let mut failures = Vec::new();
    let mut tried = 0;
    for (id, body, expected) in corpus() {
        // Only a JSON object is a dry run's spec.
        let Ok(spec @ Value::Object(_)) = serde_json::from_str::<Value>(&body) else { continue };
        tried += 1;
        let outcome = intake::submit(&ports, &json!({"dry_run": spec}).to_string(), &id, None)
            .await
            .expect("intake never fails on bad input");
        match outcome {
            Intake::Rejected { reason, .. } if reason.contains(expected.as_str()) => {}
            other => failures.push(format!("{id}: {other:?}, expected a rejection naming `{expected}`")),
        }
    }
    assert!(failures.is_empty(), "{} of {tried} cases:\n{}", failures.len(), failures.join("\n"));
    let state = cloud.lock();
    assert!(state.objects.is_empty(), "a dry run writes nothing: {:?}", state.objects.keys().collect::<Vec<_>>());
    assert!(state.instances.is_empty() && state.volumes.is_empty() && state.queue.is_empty());
    println!("hostile dry runs: {tried} specs, all rejected with the field named, nothing written");
}
