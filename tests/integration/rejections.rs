//! Bad input through intake against moto: each gets a REJECTED record with a
//! precise reason, creates no AWS resource, and is not retried.

use flotilla_shared::record::JobState;
use serde_json::json;

use crate::moto::{job, MotoStack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_malformed_specs_are_rejected_without_side_effects() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut cases: Vec<(String, &str, &str)> = Vec::new();
    let with = |id: &str, path: &str, value: serde_json::Value| {
        let mut spec = job(id);
        spec[path] = value;
        spec.to_string()
    };
    cases.push((r#"{"id": "broken-json", "fleet": "#.to_string(), "", "malformed JSON"));
    cases.push((with("unknown-field", "colour", json!("red")), "unknown-field", "unknown field `colour`"));
    cases.push((
        with("wrong-type", "deadline_minutes", json!("soon")),
        "wrong-type",
        "deadline_minutes: invalid type: string \"soon\"",
    ));
    cases.push((
        with("absurd-count", "fleet", json!({"count": 5000000})),
        "absurd-count",
        "fleet.count: must be 1..=1000, got 5000000",
    ));
    cases.push((with("quote-tag", "tags", json!({"team": "a'b"})), "quote-tag", "tags.team: value contains `'`"));
    cases.push((
        with("semicolon-program", "run", json!({"commands": [["ls;reboot"]]})),
        "semicolon-program",
        "run.commands[0][0]: program `ls;reboot` must be a plain path",
    ));
    cases.push((
        with("newline-arg", "run", json!({"commands": [["echo", "a\nreboot"]]})),
        "newline-arg",
        "run.commands[0][1]: control character U+000A not allowed",
    ));
    cases.push((
        with(
            "too-big",
            "fleet",
            json!({"items": 1000000, "items_per_instance_minute": 1, "within_minutes": 1, "max_instances": 10}),
        ),
        "too-big",
        "needs 1000000 instances, above max_instances 10",
    ));
    // A volume and a snapshot in the account that their owner never opted in.
    let ec2 = stack.ec2();
    let volume = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect("volume");
    let volume = volume.volume_id().expect("id").to_string();
    let snapshot = ec2.create_snapshot().volume_id(&volume).send().await.expect("snapshot");
    let snapshot = snapshot.snapshot_id().expect("id").to_string();
    let with_source = |id: &str, source: serde_json::Value| {
        let mut spec = job(id);
        spec["volumes"][0]["source"] = source;
        spec["volumes"][0]["snapshot"] = json!("never");
        spec.to_string()
    };
    let volume_reason = format!("volumes[0].source.volume_id: {volume} lacks the opt-in tag flotilla:allow=flotilla");
    let snapshot_reason =
        format!("volumes[0].source.snapshot_id: {snapshot} lacks the opt-in tag flotilla:allow=flotilla");
    cases.push((with_source("steal-volume", json!({"volume_id": volume})), "steal-volume", &volume_reason));
    cases.push((with_source("steal-snapshot", json!({"snapshot_id": snapshot})), "steal-snapshot", &snapshot_reason));
    for (body, _, _) in &cases {
        stack.submit(body).await;
    }
    for _ in 0..3 {
        stack.pump_once(&ports, false).await;
    }
    for (_, id, reason) in cases.iter().skip(1) {
        let record = stack.record(&ports, id).await.unwrap_or_else(|| panic!("no record for {id}"));
        assert_eq!(record.state, JobState::Rejected, "{id}");
        assert!(record.reason.contains(reason), "{id}: {}", record.reason);
        assert!(record.rejected_input.is_some());
    }
    // The malformed body has no readable id: its record is named after the message.
    let listed = flotilla_shared::aws::s3_client(&stack.config)
        .list_objects_v2()
        .bucket(&stack.bucket)
        .prefix("jobs/job-")
        .send()
        .await
        .expect("list");
    let records: Vec<&str> =
        listed.contents().iter().filter_map(|o| o.key()).filter(|k| k.ends_with("/job.json")).collect();
    assert_eq!(records.len(), 1, "one record for the unnamed malformed body");
    let key = records[0].to_string();
    let id = key.trim_start_matches("jobs/").trim_end_matches("/job.json");
    let record = stack.record(&ports, id).await.expect("record");
    assert!(record.reason.starts_with("malformed JSON"), "{}", record.reason);

    // Nothing was launched, and nothing is left to retry.
    let instances = stack.ec2().describe_instances().send().await.expect("describe");
    assert!(instances.reservations().is_empty());
    let volumes = stack.ec2().describe_volumes().send().await.expect("volumes");
    let ids: Vec<_> = volumes.volumes().iter().filter_map(|v| v.volume_id()).collect();
    assert_eq!(ids, vec![volume.as_str()], "only the user's own volume");
    assert_eq!(stack.pump_once(&ports, false).await, 0, "no message came back for retry");
}
