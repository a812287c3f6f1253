//! The simulator's figures, pinned. The simulator is deterministic, so every
//! seed `make chaos` runs has one line of figures (outcome, calls, mutating
//! calls, passes, record bytes, virtual time) checked in under
//! `tests/fingerprint/`. A refactor that means to change nothing must leave
//! every line as it is; a change of behaviour shows up here seed by seed.
//!
//! `make test` compares the seeds it runs, `make chaos` all of them.
//! `make fingerprint` (FLOTILLA_FINGERPRINT=write) rewrites the lines of the
//! seeds it runs and keeps the others.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use flotilla_testkit::sim::{lineages::WorldResult, SimResult};

pub struct Fingerprint {
    path: PathBuf,
    pinned: BTreeMap<String, String>,
    seen: Mutex<BTreeMap<String, String>>,
    write: bool,
}

impl Fingerprint {
    /// `name` is the file under `tests/fingerprint/`: one per test, so two
    /// tests of one binary never write one file.
    pub fn open(name: &str) -> Fingerprint {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fingerprint").join(format!("{name}.txt"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut pinned = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (key, figures) =
                line.split_once(": ").unwrap_or_else(|| panic!("{}: not `key: figures`: {line}", path.display()));
            assert!(pinned.insert(key.to_string(), figures.to_string()).is_none(), "{}: {key} twice", path.display());
        }
        let write = std::env::var("FLOTILLA_FINGERPRINT").is_ok_and(|v| v == "write");
        Fingerprint { path, pinned, seen: Mutex::default(), write }
    }

    /// Records one run's figures; in check mode, says how they differ from the pinned line.
    pub fn check(&self, key: &str, figures: String) -> Option<String> {
        self.seen.lock().expect("fingerprint").insert(key.to_string(), figures.clone());
        if self.write {
            return None;
        }
        match self.pinned.get(key) {
            Some(pinned) if *pinned == figures => None,
            Some(pinned) => Some(format!("{key}:\n  pinned {pinned}\n  now    {figures}")),
            None => Some(format!("{key}: not pinned (now {figures}); run `make fingerprint`")),
        }
    }

    /// Pinned keys of `kind` up to `last` that this run never compared: a
    /// seed that stopped running must not pass silently.
    pub fn unseen(&self, kind: &str, last: u64) -> Vec<String> {
        let seen = self.seen.lock().expect("fingerprint");
        self.pinned
            .keys()
            .filter(|k| sort_key(k).0 == kind && sort_key(k).1 <= last && !seen.contains_key(*k))
            .map(|k| format!("{k}: pinned, never run"))
            .collect()
    }

    /// In write mode, the file with every line seen replaced and the rest kept.
    pub fn finish(&self) {
        if !self.write {
            return;
        }
        let mut lines = self.pinned.clone();
        lines.extend(self.seen.lock().expect("fingerprint").clone());
        let mut keys: Vec<&String> = lines.keys().collect();
        keys.sort_by_key(|k| sort_key(k));
        let mut text = String::from(
            "# The simulator's figures per seed (tests/integration/fingerprint.rs).\n\
             # Regenerate with `make fingerprint`; say in the commit why a line changed.\n",
        );
        for key in keys {
            text.push_str(&format!("{key}: {}\n", lines[key]));
        }
        std::fs::create_dir_all(self.path.parent().expect("dir")).expect("fingerprint dir");
        std::fs::write(&self.path, text).expect("write fingerprint");
        eprintln!("fingerprint: wrote {} line(s) to {}", lines.len(), self.path.display());
    }
}

/// "job 9" before "job 10".
fn sort_key(key: &str) -> (String, u64) {
    let (kind, number) = key.rsplit_once(' ').unwrap_or((key, "0"));
    (kind.to_string(), number.parse().unwrap_or(0))
}

pub fn job_figures(result: &SimResult) -> String {
    format!(
        "shards={} state={} violations={} calls={} mutating={} floor={} passes={} record_bytes={} virtual_minutes={}",
        result.shards,
        result.state.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
        result.violations.len(),
        result.calls,
        result.mutating_calls,
        result.call_floor,
        result.passes,
        result.record_bytes,
        result.virtual_minutes,
    )
}

pub fn world_figures(result: &WorldResult) -> String {
    let map = |m: &BTreeMap<String, usize>| m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",");
    let actions = result.reaper_actions.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",");
    format!(
        "jobs={} runs={} consumers={} overlapping={} cancels_first={} states={} reaper={} rescues={} bound_stops={} \
         max_bound_lateness_s={} calls={} mutating={} violations={}",
        result.jobs,
        result.runs,
        result.consumers,
        result.overlapping,
        result.cancels_first,
        map(&result.states),
        actions,
        result.rescues,
        result.bound_stops,
        result.max_bound_lateness_seconds,
        result.calls,
        result.mutating_calls,
        result.violations.len(),
    )
}
