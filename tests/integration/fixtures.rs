//! Records and messages written by earlier code still load, unchanged.
//! Deployed stacks hold job records in S3 and wakes in SQS across an
//! upgrade, so every type change must read what `tests/fixtures/` holds
//! (records and wakes as this code's predecessors wrote them) and write it
//! back field for field.

use std::path::PathBuf;

use flotilla_shared::reconcile::WakeMessage;
use flotilla_shared::record::JobRecord;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

fn fixtures(kind: &str) -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(kind);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).expect("fixture")))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "fixtures in {}", dir.display());
    files
}

/// Parsed as the adapters parse it, then written back: the same JSON.
fn round_trip<T: DeserializeOwned + Serialize>(name: &str, text: &str) {
    let parsed: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name} no longer loads: {e}"));
    let written = serde_json::to_value(&parsed).expect("serialize");
    let original: Value = serde_json::from_str(text).expect("json");
    assert_eq!(written, original, "{name} does not survive a load and save unchanged");
}

#[test]
fn job_records_written_by_earlier_code_load_and_save_unchanged() {
    for (name, text) in fixtures("records") {
        round_trip::<JobRecord>(&name, &text);
    }
}

#[test]
fn wake_messages_written_by_earlier_code_still_parse() {
    for (name, text) in fixtures("messages") {
        round_trip::<WakeMessage>(&name, &text);
    }
}
