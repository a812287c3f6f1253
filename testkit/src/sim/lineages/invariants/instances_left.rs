//! No managed instance left running once the world settled.

use super::*;

pub const NAME: &str = "instances left";

pub fn check(end: &End<'_>, found: &mut Found) {
    for instance in &end.state.instances {
        let job = instance.tags.get(tags::JOB_ID).cloned().unwrap_or_default();
        if !matches!(instance.state.as_str(), "terminated" | "shutting-down") {
            found.push((NAME, format!("{} of {job} is {}", instance.id, instance.state)));
        }
    }
}
