//! A step runs once, whatever SSM delivers: the step's own command re-sent
//! by hand (as a retried SendCommand whose reply was lost would be), with
//! the same document, parameters and comment, while it runs and after it
//! ended, through the real SDK against moto.

use std::time::Duration;

use flotilla_shared::record::{JobRecord, JobState, Phase};

use crate::moto::{job, MotoStack};

const LIMIT: Duration = Duration::from_secs(180);

/// The phase's command id and the instance it runs on, once sent.
fn sent(record: &JobRecord, phase: Phase) -> Option<(String, String)> {
    let attempt = record.shards[0].current()?;
    let run = attempt.phase(phase)?;
    let command = record.commands.get(&run.batch)?.command_id.clone()?;
    Some((command, attempt.instance_id.clone()?))
}

async fn pump_until<T>(stack: &MotoStack, job_id: &str, ready: impl Fn(&JobRecord) -> Option<T>) -> T {
    let ports = stack.ports();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        stack.pump_once(&ports, false).await;
        if let Some(found) = stack.record(&ports, job_id).await.as_ref().and_then(&ready) {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "{job_id}: condition never held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send `command_id`'s command again to `instance`, exactly as it was sent.
async fn resend(stack: &MotoStack, command_id: &str, instance: &str) -> String {
    let ssm = stack.ssm();
    let listed = ssm.list_commands().command_id(command_id).send().await.expect("list");
    let original = &listed.commands()[0];
    let mut again = ssm
        .send_command()
        .document_name(original.document_name().expect("document"))
        .instance_ids(instance)
        .comment(original.comment().unwrap_or_default())
        .set_parameters(original.parameters().cloned());
    if let Some(seconds) = original.timeout_seconds() {
        again = again.timeout_seconds(seconds);
    }
    again.send().await.expect("resend").command().and_then(|c| c.command_id()).expect("id").to_string()
}

async fn finished(stack: &MotoStack, command_id: &str, instance: &str) -> (String, i32) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let out = stack.ssm().get_command_invocation().command_id(command_id).instance_id(instance).send().await;
        if let Ok(out) = out {
            let status = out.status().map(|s| s.as_str().to_string()).unwrap_or_default();
            if !matches!(status.as_str(), "Pending" | "InProgress" | "Delayed") {
                return (status, out.response_code());
            }
        }
        assert!(std::time::Instant::now() < deadline, "{command_id} never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_re_sent_while_it_runs_and_after_it_ended_starts_once() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("once-1");
    spec["fleet"] = serde_json::json!({"count": 1});
    let (go, cleanup_go) = (stack.scratch.join("go"), stack.scratch.join("cleanup-go"));
    spec["env"]["GO"] = serde_json::json!(go.display().to_string());
    spec["env"]["CLEANUP_GO"] = serde_json::json!(cleanup_go.display().to_string());
    // Counts its starts on the instance, then fails once the test says so.
    spec["run"] = serde_json::json!({"script": "echo start >> \"$HOME/starts\"; until [ -e \"$GO\" ]; do sleep 0.2; done; exit 3", "timeout_seconds": 120});
    spec["before_unmount"] =
        serde_json::json!({"script": "until [ -e \"$CLEANUP_GO\" ]; do sleep 0.2; done", "timeout_seconds": 120});
    stack.submit(&spec.to_string()).await;
    let (run, instance) = pump_until(&stack, "once-1", |r| sent(r, Phase::Run)).await;
    let starts =
        || std::fs::read_to_string(stack.scratch.join(&instance).join("starts")).unwrap_or_default().lines().count();
    let deadline = std::time::Instant::now() + LIMIT;
    while starts() == 0 {
        assert!(std::time::Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // While it runs: the second delivery waits for the first, then reports its code.
    let while_running = resend(&stack, &run, &instance).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = stack.ssm().get_command_invocation().command_id(&while_running).instance_id(&instance).send().await;
    let status = waiting.ok().and_then(|w| w.status().map(|s| s.as_str().to_string()));
    assert_eq!(status.as_deref(), Some("InProgress"), "the second delivery waits for the first");
    std::fs::write(&go, "").expect("go");
    assert_eq!(finished(&stack, &while_running, &instance).await, ("Failed".to_string(), 3));
    assert_eq!(starts(), 1, "the step started once");

    // After it ended (cleanup holds the instance): the code, nothing run.
    pump_until(&stack, "once-1", |r| sent(r, Phase::BeforeUnmount)).await;
    let after = resend(&stack, &run, &instance).await;
    assert_eq!(finished(&stack, &after, &instance).await, ("Failed".to_string(), 3));
    assert_eq!(starts(), 1, "nothing ran again");

    std::fs::write(&cleanup_go, "").expect("cleanup go");
    let record = stack.run_to_end(&ports, "once-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("run exited 3"), "{}", record.reason);
    assert_eq!(stack.running_managed().await, 0);
}

/// The instance is stopped mid-step (its processes die) and started again;
/// its agent delivers the interrupted command again. The guard finds the
/// step `started` and never finished: it runs nothing and exits with the
/// reserved code, which the reconciler reads as a lost instance, and the
/// shard is retried on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_killed_with_its_instance_is_never_rerun_and_the_shard_retries() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("once-2");
    spec["fleet"] = serde_json::json!({"count": 1});
    let go = stack.scratch.join("go-2");
    spec["env"]["GO"] = serde_json::json!(go.display().to_string());
    spec["run"] = serde_json::json!({"script": "echo start >> \"$HOME/starts\"; until [ -e \"$GO\" ]; do sleep 0.2; done", "timeout_seconds": 120});
    stack.submit(&spec.to_string()).await;
    let (run, instance) = pump_until(&stack, "once-2", |r| sent(r, Phase::Run)).await;
    let starts =
        |id: &str| std::fs::read_to_string(stack.scratch.join(id).join("starts")).unwrap_or_default().lines().count();
    let deadline = std::time::Instant::now() + LIMIT;
    while starts(&instance) == 0 {
        assert!(std::time::Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A reboot between two passes: the step dies with the instance's processes.
    stack.ec2().stop_instances().instance_ids(&instance).send().await.expect("stop");
    stack.ec2().start_instances().instance_ids(&instance).send().await.expect("start");
    let (status, code) = finished(&stack, &run, &instance).await;
    assert_eq!((status.as_str(), code), ("Failed", flotilla_shared::shell::LOST_EXIT_CODE));
    let invocation = stack.ssm().get_command_invocation().command_id(&run).instance_id(&instance).send().await;
    let stderr = invocation.expect("invocation").standard_error_content().unwrap_or_default().to_string();
    assert!(stderr.contains(flotilla_shared::shell::LOST_MARKER), "{stderr}");
    assert_eq!(starts(&instance), 1, "the re-delivery ran nothing");

    std::fs::write(&go, "").expect("go");
    let record = stack.run_to_end(&ports, "once-2", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let attempts = &record.shards[0].attempts;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let first = attempts[0].end.as_ref().expect("first attempt ended");
    assert_eq!(first.cause, flotilla_shared::record::EndCause::InstanceLost, "{first:?}");
    let second = attempts[1].instance_id.clone().expect("second instance");
    assert_ne!(second, instance);
    assert_eq!(starts(&second), 1);
    assert_eq!(stack.running_managed().await, 0);
}
