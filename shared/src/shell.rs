//! Every shell line Flotilla sends to an instance is built here, and every
//! value that came from a job spec or from AWS goes through [`quote`].

use std::collections::BTreeMap;

use crate::spec::{CommandSpec, EnvValue, SecretRef};

/// Quote one word for POSIX sh/bash so it reaches the program verbatim.
///
/// Single quotes disable every expansion; an embedded `'` becomes `'\''`.
/// Words made only of safe characters are left bare for readable logs.
pub fn quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.to_string();
    }
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// An argv as one shell line.
pub fn command_line(argv: &[String]) -> String {
    argv.iter().map(|word| quote(word)).collect::<Vec<_>>().join(" ")
}

/// What every script on an instance knows about its job.
#[derive(Debug, Clone)]
pub struct Preamble<'a> {
    pub job_id: &'a str,
    /// The instances this command goes to, with their shard index.
    pub instances: &'a [(String, u32)],
    /// Shards in the whole job.
    pub shard_count: u32,
    pub env: &'a BTreeMap<String, EnvValue>,
    /// Volume name to mount point.
    pub mounts: &'a [(String, String)],
    /// For jobs with items: each shard's `[start, end)` is exported.
    pub items: Option<u64>,
    /// The `s3://` folder of the job's manifests: shard i reads `<i>.txt`.
    pub manifests: Option<&'a str>,
}

impl Preamble<'_> {
    /// `with_env`: the job's environment, secrets included, is for its own
    /// steps only; mount and unmount must not fail on a secret.
    fn lines(&self) -> Vec<String> {
        let mut lines = vec![
            "set -euo pipefail".to_string(),
            // The SSM agent sets AWS_SSM_INSTANCE_ID; IMDSv2 is the fallback.
            "FLOTILLA_INSTANCE_ID=\"${AWS_SSM_INSTANCE_ID:-$(TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') && curl -sS -H \"X-aws-ec2-metadata-token: $TOKEN\" http://169.254.169.254/latest/meta-data/instance-id)}\"".to_string(),
            format!("export FLOTILLA_JOB_ID={}", quote(self.job_id)),
            "export FLOTILLA_INSTANCE_ID".to_string(),
            format!("export FLOTILLA_SHARD_COUNT={}", self.shard_count),
            "case \"$FLOTILLA_INSTANCE_ID\" in".to_string(),
        ];
        let count = self.shard_count;
        for (id, index) in self.instances {
            let mut exports = format!("FLOTILLA_SHARD_INDEX={index}");
            if let Some(items) = self.items {
                let range = crate::plan::shard_range(items, *index, count);
                exports.push_str(&format!(" FLOTILLA_ITEM_START={} FLOTILLA_ITEM_END={}", range.start, range.end));
            }
            if let Some(folder) = self.manifests {
                let manifest = crate::work::manifest_key(folder, *index);
                exports.push_str(&format!(" FLOTILLA_MANIFEST={}", quote(&manifest)));
            }
            lines.push(format!("  {}) export {exports} ;;", quote(id)));
        }
        lines.push(
            "  *) echo \"flotilla: instance $FLOTILLA_INSTANCE_ID is not in this job\" >&2; exit 97 ;;".to_string(),
        );
        lines.push("esac".to_string());
        for (name, mount_point) in self.mounts {
            let var = name.to_ascii_uppercase().replace('-', "_");
            lines.push(format!("export FLOTILLA_MOUNT_{var}={}", quote(mount_point)));
        }
        lines
    }

    /// The job's environment for its own steps: the shard's manifest and
    /// the env, secrets read on the instance with its own credentials (only
    /// their names travel in the command). Any of these may fail, so they
    /// run inside the step guard.
    fn env_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let region = "${AWS_SSM_REGION_NAME:+--region \"$AWS_SSM_REGION_NAME\"}";
        if self.manifests.is_some() {
            // The shard's items, fetched with the instance's own credentials;
            // item names never travel inside a script. A failed read stops the step.
            lines.push("FLOTILLA_MANIFEST_FILE=$(mktemp -t flotilla-manifest.XXXXXX)".to_string());
            lines.push(format!(
                "aws s3 cp --only-show-errors {region} \"$FLOTILLA_MANIFEST\" \"$FLOTILLA_MANIFEST_FILE\""
            ));
            lines.push("export FLOTILLA_MANIFEST_FILE".to_string());
        }
        for (key, value) in self.env {
            // Keys are validated as [A-Za-z_][A-Za-z0-9_]*, values are quoted.
            match value {
                EnvValue::Plain(value) => lines.push(format!("export {key}={}", quote(value))),
                // A bare assignment, so a failed read stops the step (set -e);
                // `export K=$(...)` would hide the failure.
                EnvValue::Secret(SecretRef::FromSsm(path)) => {
                    lines.push(format!(
                        "{key}=$(aws ssm get-parameter {region} --with-decryption --name {} --query Parameter.Value --output text)",
                        quote(path)
                    ));
                    lines.push(format!("export {key}"));
                }
                EnvValue::Secret(SecretRef::FromSecretsManager(arn)) => {
                    // The secret's own Region, from its ARN.
                    let secret_region = arn.split(':').nth(3).unwrap_or_default();
                    lines.push(format!(
                        "{key}=$(aws secretsmanager get-secret-value --region {} --secret-id {} --query SecretString --output text)",
                        quote(secret_region),
                        quote(arn)
                    ));
                    // A binary secret has no SecretString: the CLI prints None.
                    lines.push(format!(
                        "[ \"${key}\" != None ] || {{ echo {} >&2; exit 1; }}",
                        quote(&format!(
                            "flotilla: secret {arn} has no SecretString (binary secrets are not supported)"
                        ))
                    ));
                    lines.push(format!("export {key}"));
                }
            }
        }
        lines
    }
}

/// The exit code of a step whose earlier delivery started on this instance
/// and never finished (its process died: agent killed, reboot), or that
/// could not keep the guard's state: the step's outcome is unknown. With
/// [`LOST_MARKER`] on stderr the reconciler reads it as a lost instance,
/// never as the step's own result.
pub const LOST_EXIT_CODE: i32 = 237;
/// What the guard prints when it exits [`LOST_EXIT_CODE`]: a step that exits
/// 237 itself is not taken for a lost one.
pub const LOST_MARKER: &str = "flotilla-guard: step outcome unknown";

/// The on-instance guard: a user step runs at most once per job, shard,
/// phase and instance (an attempt has its own instance), however often SSM
/// delivers its command (a retried SendCommand whose reply was lost, an
/// agent that comes back). Under `flock`, it writes `started` before the
/// step and `done <code>` after it, in state that survives a reboot; the
/// job's environment and secrets are read inside it. A delivery that finds
/// the lock held waits for it (SSM's timeout bounds the wait); one that
/// finds `done` reports that code; one that finds `started` alone runs
/// nothing and exits [`LOST_EXIT_CODE`]. The step runs with the lock's
/// descriptor closed, so a daemon it leaves running never holds the lock.
const STEP_GUARD: &str = r#"flotilla_guard() {
  local dir="${FLOTILLA_STATE_DIR:-/var/lib/flotilla}/steps"
  local key="$dir/$FLOTILLA_JOB_ID.$FLOTILLA_SHARD_INDEX.$1.$FLOTILLA_INSTANCE_ID"
  { mkdir -p "$dir" && exec 9>>"$key.lock" && flock 9; } || { echo "flotilla-guard: step outcome unknown: cannot lock $key" >&2; exit 237; }
  local last=""
  if [ -f "$key.state" ]; then last=$(tail -n 1 "$key.state"); fi
  case "$last" in
    "done "*) echo "flotilla: $1 already ran on this instance (exit ${last#done }); not run again" >&2; exit "${last#done }" ;;
    started*) echo "flotilla-guard: step outcome unknown: an earlier delivery of $1 started here and never finished; not run again" >&2; exit 237 ;;
  esac
  case "$1" in setup|run)
    if [ -e "$dir/$FLOTILLA_JOB_ID.$FLOTILLA_SHARD_INDEX.closed.$FLOTILLA_INSTANCE_ID" ]; then
      echo "flotilla-guard: step outcome unknown: cleanup has started here; $1 not run" >&2; exit 237
    fi ;;
  esac
  { echo started > "$key.state" && sync "$key.state" "$dir"; } || { echo "flotilla-guard: step outcome unknown: cannot record $key" >&2; exit 237; }
  set +e
  ( set -e; flotilla_step ) 9>&-
  local rc=$?
  set -e
  { echo "done $rc" >> "$key.state" && sync "$key.state"; } 2>/dev/null || echo "flotilla: could not record that $1 ended ($rc)" >&2
  exit "$rc"
}"#;

/// Cleanup never runs beside work, whatever SSM delivers late: the first
/// cleanup step (`before_unmount`, or the unmount) marks the shard's work
/// closed on this instance, so a `setup` or `run` delivered later never
/// starts (the guard checks the mark under its own lock), then waits for
/// any that is running to end (its lock; SSM's timeout bounds the wait).
const WORK_FENCE: &str = r#"flotilla_close_work() {
  local dir="${FLOTILLA_STATE_DIR:-/var/lib/flotilla}/steps"
  local base="$dir/$FLOTILLA_JOB_ID.$FLOTILLA_SHARD_INDEX"
  { mkdir -p "$dir" && : > "$base.closed.$FLOTILLA_INSTANCE_ID" && sync "$dir"; } || { echo "flotilla-guard: step outcome unknown: cannot close the work of $base" >&2; exit 237; }
  local phase
  for phase in "$@"; do
    { exec 7>>"$base.$phase.$FLOTILLA_INSTANCE_ID.lock" && flock 7 && exec 7>&-; } || { echo "flotilla-guard: step outcome unknown: cannot wait for $phase" >&2; exit 237; }
  done
}"#;

/// The lines of the work fence, then its call, for a cleanup script that
/// waits for these phases.
fn close_work(phases: &str) -> Vec<String> {
    if crate::mutation::on(crate::mutation::Mutation::NoWorkFence) {
        return vec![];
    }
    let mut lines: Vec<String> = WORK_FENCE.lines().map(str::to_string).collect();
    lines.push(format!("flotilla_close_work {phases}"));
    lines
}

/// The lines of a user step (`phase` names it for the guard): argv commands
/// quoted, or the user's script run by its own bash so it cannot break the
/// preamble; the job's environment first; all of it under [`STEP_GUARD`].
pub fn step_script(preamble: &Preamble<'_>, step: &CommandSpec, phase: &str) -> Vec<String> {
    let mut lines = preamble.lines();
    let guarded = !crate::mutation::on(crate::mutation::Mutation::NoGuard);
    if guarded {
        lines.extend(STEP_GUARD.lines().map(str::to_string));
    }
    lines.push("flotilla_step() {".to_string());
    lines.extend(preamble.env_lines().into_iter().map(|line| format!("  {line}")));
    if let Some(script) = &step.script {
        lines.push(format!("  bash -c {} flotilla-step", quote(script)));
    } else {
        lines.extend(step.commands.iter().map(|argv| format!("  {}", command_line(argv))));
    }
    lines.push("}".to_string());
    if phase == "before_unmount" {
        lines.extend(close_work("setup run"));
    }
    lines.push(if guarded { format!("flotilla_guard {}", quote(phase)) } else { "flotilla_step".to_string() });
    lines
}

/// One data volume as seen from an instance.
#[derive(Debug, Clone)]
pub struct MountTarget {
    pub name: String,
    pub device: String,
    pub mount_point: String,
    /// Instance id to volume id attached to it.
    pub volume_by_instance: Vec<(String, String)>,
    /// Instances whose volume Flotilla created empty in this attempt: the
    /// only ones that may be formatted (never a snapshot_id source, a
    /// volume_id source or a retry's volume restored from a snapshot).
    pub created_blank_on: Vec<String>,
}

/// Only for a volume Flotilla created empty in this attempt: format on "no
/// filesystem found" (`blkid -p` exits 2) only. An unreadable device, an
/// ambivalent probe (8) or any other answer stops the step instead of wiping
/// data.
const FORMAT_IF_BLANK: &str = r#"format_if_blank() {
  dd if="$1" of=/dev/null bs=4096 count=1 status=none || { echo "flotilla: cannot read $1" >&2; return 1; }
  local rc=0; blkid -p "$1" >/dev/null 2>&1 || rc=$?
  case $rc in
    0) ;;
    2) mkfs -t ext4 -q "$1" ;;
    *) echo "flotilla: blkid -p $1 exited $rc; not formatting" >&2; return 1 ;;
  esac
}"#;

/// Marker the local emulator looks for: block-device work cannot run there.
pub const VOLUME_OP_MARKER: &str = "# flotilla:volume-op";

/// Find each volume's device (NVMe-aware), format it if new and blank, mount it.
pub fn mount_script(preamble: &Preamble<'_>, targets: &[MountTarget]) -> Vec<String> {
    let mut lines = vec![format!("{VOLUME_OP_MARKER} mount")];
    lines.extend(preamble.lines());
    lines.push("find_device() {".to_string());
    // Nitro exposes EBS as NVMe; the by-id link carries the volume id without its dash.
    lines.push("  local vol=\"${1//-/}\" requested=\"$2\" alt=\"/dev/xvd${2#/dev/sd}\"".to_string());
    lines.push("  for _ in $(seq 1 60); do".to_string());
    lines.push(
        "    for dev in \"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${vol}\" \"$requested\" \"$alt\"; do"
            .to_string(),
    );
    lines.push("      if [ -b \"$dev\" ]; then readlink -f \"$dev\"; return 0; fi".to_string());
    lines.push("    done; sleep 1".to_string());
    lines.push("  done; echo \"flotilla: no block device for $1\" >&2; return 1".to_string());
    lines.push("}".to_string());
    lines.extend(FORMAT_IF_BLANK.lines().map(str::to_string));
    for target in targets {
        lines.push("VOLUME_ID=".to_string());
        lines.push("case \"$FLOTILLA_INSTANCE_ID\" in".to_string());
        for (instance, volume) in &target.volume_by_instance {
            let blank = u8::from(target.created_blank_on.contains(instance));
            lines.push(format!("  {}) VOLUME_ID={} BLANK={blank} ;;", quote(instance), quote(volume)));
        }
        lines.push("esac".to_string());
        lines.push("if [ -n \"$VOLUME_ID\" ]; then".to_string());
        lines.push(format!("  DEV=$(find_device \"$VOLUME_ID\" {})", quote(&target.device)));
        lines.push("  if [ \"$BLANK\" = 1 ]; then format_if_blank \"$DEV\" || exit 1; fi".to_string());
        lines.push(format!("  mkdir -p {}", quote(&target.mount_point)));
        lines.push(format!("  mountpoint -q {mp} || mount \"$DEV\" {mp}", mp = quote(&target.mount_point)));
        lines.push(format!("  echo \"mounted $VOLUME_ID ($DEV) at \"{}", quote(&target.mount_point)));
        lines.push("fi".to_string());
    }
    lines
}

/// Flush and unmount, so the snapshot that follows is consistent.
pub fn unmount_script(preamble: &Preamble<'_>, targets: &[MountTarget]) -> Vec<String> {
    let mut lines = vec![format!("{VOLUME_OP_MARKER} unmount")];
    lines.extend(preamble.lines());
    lines.extend(close_work("setup run before_unmount"));
    lines.push("sync".to_string());
    for target in targets {
        let mp = quote(&target.mount_point);
        // Under `set -e` a failed umount ends the script: a busy mount is
        // never hidden behind a later volume's success.
        lines.push(format!("if mountpoint -q {mp}; then sync -f {mp}; umount {mp}; echo \"unmounted \"{mp}; fi"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    /// A fresh state directory for the step guard, one per run.
    fn state_dir() -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("flotilla-state-{}-{n}", std::process::id()));
        // An earlier run whose pid this one reuses left its guard's records here.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("state dir");
        dir.display().to_string()
    }
    use super::*;
    use proptest::prelude::*;

    fn bash_echo(words: &[String]) -> Vec<u8> {
        let line = format!("printf '%s\\0' {}", command_line(words));
        let out = std::process::Command::new("bash").arg("-c").arg(&line).output().expect("bash runs");
        assert!(out.status.success(), "bash failed on {line}");
        out.stdout
    }

    #[test]
    fn quotes_the_classics() {
        assert_eq!(quote("plain-word.txt"), "plain-word.txt");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        // Any string without NUL survives a real bash word-for-word.
        #[test]
        fn bash_sees_exactly_the_words(words in proptest::collection::vec("[^\u{0}]{0,24}", 1..5)) {
            let expected: Vec<u8> = words.iter().flat_map(|w| w.bytes().chain(std::iter::once(0))).collect();
            prop_assert_eq!(bash_echo(&words), expected);
        }
    }

    #[test]
    fn hostile_words_stay_words() {
        let words: Vec<String> =
            ["; rm -rf /", "`id`", "$HOME", "a'b\"c", "\n", "*", "&&", "\\"].iter().map(|s| s.to_string()).collect();
        let expected: Vec<u8> = words.iter().flat_map(|w| w.bytes().chain(std::iter::once(0))).collect();
        assert_eq!(bash_echo(&words), expected);
    }

    #[test]
    fn user_script_cannot_escape_its_quoting() {
        let env = BTreeMap::from([("GREETING".to_string(), EnvValue::from("it's $(whoami)"))]);
        let instances = vec![("i-0abc".to_string(), 0)];
        let preamble = Preamble {
            job_id: "j1",
            instances: &instances,
            shard_count: 1,
            env: &env,
            mounts: &[],
            items: None,
            manifests: None,
        };
        let step = CommandSpec {
            commands: vec![],
            script: Some("echo \"$GREETING\"; echo 'x'\"'\"'y'".to_string()),
            timeout_seconds: Some(5),
        };
        let script = step_script(&preamble, &step, "run").join("\n");
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("AWS_SSM_INSTANCE_ID", "i-0abc")
            .env("FLOTILLA_STATE_DIR", state_dir())
            .output()
            .expect("bash runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $(whoami)\nx'y\n");
    }

    /// A secret reaches the step as its value, read on the instance; the
    /// script carries only its name, and a failed read stops the step.
    /// The step guard in a real bash with flock: two deliveries at once run
    /// the step once (the second waits, then reports the first's code); a
    /// later one reports that code; one after a delivery that died mid-step
    /// runs nothing and exits the reserved code.
    #[test]
    fn a_step_runs_once_however_often_it_is_delivered() {
        let instances = vec![("i-0abc".to_string(), 0)];
        let env = BTreeMap::new();
        let preamble = Preamble {
            job_id: "j1",
            instances: &instances,
            shard_count: 1,
            env: &env,
            mounts: &[],
            items: None,
            manifests: None,
        };
        let state = state_dir();
        let starts = std::path::Path::new(&state).join("starts");
        let step = CommandSpec {
            commands: vec![],
            script: Some(format!("echo x >> {}; sleep \"$HOLD\"; exit 3", starts.display())),
            timeout_seconds: None,
        };
        let script = step_script(&preamble, &step, "run").join("\n");
        let deliver = |hold: &str| {
            std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("AWS_SSM_INSTANCE_ID", "i-0abc")
                .env("FLOTILLA_STATE_DIR", &state)
                .env("HOLD", hold)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("bash runs")
        };
        let count = || std::fs::read_to_string(&starts).unwrap_or_default().lines().count();
        let first = deliver("1");
        while count() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let second = deliver("0");
        let (a, b) = (first.wait_with_output().expect("first"), second.wait_with_output().expect("second"));
        assert_eq!((a.status.code(), b.status.code()), (Some(3), Some(3)), "{}", String::from_utf8_lossy(&b.stderr));
        assert_eq!(count(), 1, "the step started once");
        let third = deliver("0").wait_with_output().expect("third");
        assert_eq!((third.status.code(), count()), (Some(3), 1), "a later delivery reports the code");
        // A delivery whose process dies mid-step (the agent killed): the next runs nothing.
        let state2 = state_dir();
        let mut dying = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("AWS_SSM_INSTANCE_ID", "i-0abc")
            .env("FLOTILLA_STATE_DIR", &state2)
            .env("HOLD", "30")
            .process_group(0)
            .spawn()
            .expect("bash runs");
        while count() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", dying.id())]).status().expect("kill");
        let _ = dying.wait();
        let after = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("AWS_SSM_INSTANCE_ID", "i-0abc")
            .env("FLOTILLA_STATE_DIR", &state2)
            .env("HOLD", "0")
            .output()
            .expect("bash runs");
        assert_eq!(after.status.code(), Some(LOST_EXIT_CODE), "{}", String::from_utf8_lossy(&after.stderr));
        assert_eq!(count(), 2, "nothing ran again");
    }

    /// Cleanup never runs beside work: `before_unmount` waits for a run in
    /// progress to end, and a run delivered after cleanup started never starts.
    #[test]
    fn cleanup_waits_for_work_and_closes_it() {
        let instances = vec![("i-0abc".to_string(), 0)];
        let env = BTreeMap::new();
        let preamble = Preamble {
            job_id: "j2",
            instances: &instances,
            shard_count: 1,
            env: &env,
            mounts: &[],
            items: None,
            manifests: None,
        };
        let state = state_dir();
        let log = std::path::Path::new(&state).join("log");
        let step = |text: &str| CommandSpec {
            commands: vec![],
            script: Some(format!(
                "echo {text}-start >> {log}; sleep \"$HOLD\"; echo {text}-end >> {log}",
                log = log.display()
            )),
            timeout_seconds: None,
        };
        let run = step_script(&preamble, &step("run"), "run").join("\n");
        let cleanup = step_script(&preamble, &step("cleanup"), "before_unmount").join("\n");
        let deliver = |script: &str, hold: &str| {
            std::process::Command::new("bash")
                .arg("-c")
                .arg(script)
                .env("AWS_SSM_INSTANCE_ID", "i-0abc")
                .env("FLOTILLA_STATE_DIR", &state)
                .env("HOLD", hold)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("bash runs")
        };
        let lines =
            || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();
        let working = deliver(&run, "1");
        while lines().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let cleaning = deliver(&cleanup, "0");
        let (a, b) = (working.wait_with_output().expect("run"), cleaning.wait_with_output().expect("cleanup"));
        assert_eq!((a.status.code(), b.status.code()), (Some(0), Some(0)), "{}", String::from_utf8_lossy(&b.stderr));
        assert_eq!(lines(), ["run-start", "run-end", "cleanup-start", "cleanup-end"], "cleanup waited for the run");
        // A setup delivered now (late) never starts.
        let setup = step_script(&preamble, &step("setup"), "setup").join("\n");
        let late = deliver(&setup, "0").wait_with_output().expect("late setup");
        assert_eq!(late.status.code(), Some(LOST_EXIT_CODE), "{}", String::from_utf8_lossy(&late.stderr));
        assert!(String::from_utf8_lossy(&late.stderr).contains(LOST_MARKER));
        assert_eq!(lines().len(), 4, "nothing ran after cleanup started");
    }

    /// The mount step formats only on "no filesystem found": a filesystem,
    /// an ambivalent probe, a probe that fails or an unreadable device never
    /// leads to mkfs.
    #[test]
    fn a_volume_is_formatted_only_when_blkid_finds_no_filesystem() {
        let bin = std::env::temp_dir().join(format!("flotilla-fake-blkid-{}", std::process::id()));
        std::fs::create_dir_all(&bin).expect("dir");
        for (tool, body) in
            [("blkid", "exit \"$BLKID_RC\""), ("dd", "exit \"$DD_RC\""), ("mkfs", "echo formatted \"$*\"")]
        {
            std::fs::write(bin.join(tool), format!("#!/bin/sh\n{body}\n")).expect("write");
            std::process::Command::new("chmod").arg("+x").arg(bin.join(tool)).status().expect("chmod");
        }
        let instances = vec![("i-0abc".to_string(), 0)];
        let env = BTreeMap::new();
        let preamble = Preamble {
            job_id: "j1",
            instances: &instances,
            shard_count: 1,
            env: &env,
            mounts: &[],
            items: None,
            manifests: None,
        };
        let script = mount_script(&preamble, &[]).join("\n");
        let run = |blkid: i32, dd: i32| {
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(format!("{script}\nformat_if_blank /dev/fake"))
                .env("AWS_SSM_INSTANCE_ID", "i-0abc")
                .env("BLKID_RC", blkid.to_string())
                .env("DD_RC", dd.to_string())
                .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
                .env("FLOTILLA_STATE_DIR", state_dir())
                .output()
                .expect("bash runs");
            (out.status.success(), String::from_utf8_lossy(&out.stdout).contains("formatted"))
        };
        assert_eq!(run(2, 0), (true, true), "no filesystem: formatted");
        assert_eq!(run(0, 0), (true, false), "a filesystem: kept");
        assert_eq!(run(8, 0), (false, false), "ambivalent probe: the step stops");
        assert_eq!(run(4, 0), (false, false), "a probe that fails: the step stops");
        assert_eq!(run(2, 1), (false, false), "an unreadable device: the step stops");
    }

    #[test]
    fn secrets_are_read_on_the_instance_and_a_failed_read_stops_the_step() {
        let bin = std::env::temp_dir().join(format!("flotilla-fake-aws-{}", std::process::id()));
        std::fs::create_dir_all(&bin).expect("dir");
        // A stand-in for the AWS CLI: prints which call it got, fails for /missing.
        let fake = "#!/bin/sh\ncase \"$*\" in *missing*) echo 'ParameterNotFound' >&2; exit 254;; *binary*) echo None; exit 0;; esac\necho \"value-of $1 $2 $4\"\n";
        std::fs::write(bin.join("aws"), fake).expect("write");
        std::process::Command::new("chmod").arg("+x").arg(bin.join("aws")).status().expect("chmod");
        let run = |env: BTreeMap<String, EnvValue>| {
            let instances = vec![("i-0abc".to_string(), 0)];
            let preamble = Preamble {
                job_id: "j1",
                instances: &instances,
                shard_count: 1,
                env: &env,
                mounts: &[],
                items: None,
                manifests: None,
            };
            let step = CommandSpec {
                commands: vec![],
                script: Some("echo \"db=$DB api=$API\"".to_string()),
                timeout_seconds: None,
            };
            let script = step_script(&preamble, &step, "run").join("\n");
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("AWS_SSM_INSTANCE_ID", "i-0abc")
                .env("AWS_SSM_REGION_NAME", "eu-west-1")
                .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
                .env("FLOTILLA_STATE_DIR", state_dir())
                .output()
                .expect("bash runs");
            (script, out)
        };
        let arn = "arn:aws:secretsmanager:us-west-2:123456789012:secret:api-key";
        let (script, out) = run(BTreeMap::from([
            ("DB".to_string(), EnvValue::Secret(SecretRef::FromSsm("/team/db".into()))),
            ("API".to_string(), EnvValue::Secret(SecretRef::FromSecretsManager(arn.into()))),
        ]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "db=value-of ssm get-parameter eu-west-1 api=value-of secretsmanager get-secret-value us-west-2\n",
            "the secret's Region comes from its ARN"
        );
        assert!(script.contains("--name /team/db") && script.contains(arn), "{script}");
        // Mount and unmount never read secrets: a refused one must not strand a volume.
        let env = BTreeMap::from([("DB".to_string(), EnvValue::Secret(SecretRef::FromSsm("/team/db".into())))]);
        let instances = vec![("i-0abc".to_string(), 0)];
        let preamble = Preamble {
            job_id: "j1",
            instances: &instances,
            shard_count: 1,
            env: &env,
            mounts: &[],
            items: None,
            manifests: None,
        };
        assert!(!mount_script(&preamble, &[]).join("\n").contains("/team/db"));
        assert!(!unmount_script(&preamble, &[]).join("\n").contains("/team/db"));
        let (_, out) =
            run(BTreeMap::from([("DB".to_string(), EnvValue::Secret(SecretRef::FromSsm("/missing".into())))]));
        assert!(!out.status.success(), "a failed read must stop the step");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "the step never ran");
        // A binary secret (no SecretString) stops the step too, not an env of "None".
        let binary = "arn:aws:secretsmanager:us-west-2:123456789012:secret:binary";
        let (_, out) =
            run(BTreeMap::from([("DB".to_string(), EnvValue::Secret(SecretRef::FromSecretsManager(binary.into())))]));
        assert!(!out.status.success(), "a binary secret must stop the step");
        assert!(String::from_utf8_lossy(&out.stderr).contains("has no SecretString"));
    }

    /// Each shard learns its own manifest's URI from the case line, and its
    /// user steps find the items in a local file; a failed read stops the step.
    #[test]
    fn each_shard_reads_its_own_manifest_and_a_failed_read_stops_the_step() {
        let bin = std::env::temp_dir().join(format!("flotilla-fake-s3-{}", std::process::id()));
        std::fs::create_dir_all(&bin).expect("dir");
        // A stand-in for `aws s3 cp SRC DST`: writes SRC's name into DST, fails for shard 2.
        let fake = "#!/bin/sh\nfor last; do :; done\ncase \"$*\" in *2.txt*) echo 'NoSuchKey' >&2; exit 1;; esac\nfor a; do case \"$a\" in s3://*) echo \"items of $a\" > \"$last\";; esac; done\n";
        std::fs::write(bin.join("aws"), fake).expect("write");
        std::process::Command::new("chmod").arg("+x").arg(bin.join("aws")).status().expect("chmod");
        let env = BTreeMap::new();
        let instances = vec![("i-0a".to_string(), 0), ("i-0b".to_string(), 1), ("i-0c".to_string(), 2)];
        let preamble = Preamble {
            job_id: "j1",
            instances: &instances,
            shard_count: 3,
            env: &env,
            mounts: &[],
            items: Some(10),
            manifests: Some("s3://bucket/work/j1/abc/"),
        };
        let step = CommandSpec {
            commands: vec![],
            script: Some("echo \"$FLOTILLA_ITEM_START-$FLOTILLA_ITEM_END $FLOTILLA_MANIFEST: $(cat \"$FLOTILLA_MANIFEST_FILE\")\"".into()),
            timeout_seconds: None,
        };
        let script = step_script(&preamble, &step, "run").join("\n");
        let run = |instance: &str| {
            std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("AWS_SSM_INSTANCE_ID", instance)
                .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
                .env("FLOTILLA_STATE_DIR", state_dir())
                .output()
                .expect("bash runs")
        };
        let out = run("i-0b");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "4-7 s3://bucket/work/j1/abc/1.txt: items of s3://bucket/work/j1/abc/1.txt\n"
        );
        let out = run("i-0c");
        assert!(!out.status.success(), "a manifest that cannot be read must stop the step");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
        // Mount and unmount do not fetch it.
        assert!(!mount_script(&preamble, &[]).join("\n").contains("s3 cp"));
    }
}
