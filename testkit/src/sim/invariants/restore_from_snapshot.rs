//! A retried shard whose volume restores on retry gets the newest
//! completed snapshot of the volume its latest earlier attempt had (as the
//! cloud, not the record, saw it), or a fresh volume if there is none.

use super::*;

pub const NAME: &str = "restore from snapshot";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { record, spec, state, .. } = *ended;
    for shard in &record.shards {
        for (i, attempt) in shard.attempts.iter().enumerate().skip(1) {
            for volume in &attempt.volumes {
                let restore = spec
                    .volumes
                    .iter()
                    .any(|v| v.name == volume.name && v.on_retry == flotilla_shared::spec::OnRetry::Restore);
                let Some(volume_id) = volume.volume_id.as_ref().filter(|_| restore) else { continue };
                let Some((owner, previous)) = shard.attempts[..i]
                    .iter()
                    .rev()
                    .find_map(|a| a.volumes.iter().find(|v| v.name == volume.name).map(|v| (a, v)))
                else {
                    continue;
                };
                // A volume created empty: if no mount step reached its instance
                // it holds nothing, not even a filesystem, and the retry must
                // start fresh (a volume restored from it is never formatted);
                // if no step after the mount did, either is right.
                let sent = |mount: bool| {
                    state.commands.iter().any(|c| {
                        let first = c.request.lines.first().map(String::as_str).unwrap_or_default();
                        let is_mount = first == format!("{} mount", flotilla_shared::shell::VOLUME_OP_MARKER);
                        let data_step = !first.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER);
                        (if mount { is_mount } else { data_step })
                            && owner.instance_id.as_ref().is_some_and(|i| c.runs.contains_key(i))
                    })
                };
                let created_empty = previous
                    .volume_id
                    .as_ref()
                    .is_some_and(|id| state.volumes.iter().any(|v| &v.id == id && v.snapshot_id.is_none()));
                let blank = created_empty && !sent(true);
                let either = created_empty && !sent(false);
                let created_at = state.volumes.iter().find(|v| &v.id == volume_id).map(|v| v.visible_at);
                let expected = state
                    .snapshots
                    .iter()
                    .filter(|_| !blank)
                    .filter(|s| s.tags.get(flotilla_shared::tags::ATTEMPT) == Some(&previous.token) && !s.fails)
                    .filter(|s| created_at.is_some_and(|at| s.completes_at <= at))
                    .max_by_key(|s| s.started_at)
                    .map(|s| s.id.clone());
                let actual = state.volumes.iter().find(|v| &v.id == volume_id).and_then(|v| v.snapshot_id.clone());
                if actual != expected && !(either && actual.is_none()) {
                    found(
                        violations,
                        NAME,
                        format!(
                            "shard {} attempt {}: {volume_id} from {actual:?}, expected {expected:?}",
                            shard.index, attempt.number
                        ),
                    );
                }
            }
        }
    }
}
