//! The job report to look at: one self-contained HTML page (no script, no
//! fetch of any kind), written beside `report.txt` as `report.html` when a
//! job ends (by the notify function, off the reconciler's hot path) and by
//! `flotilla report`. Every shard and attempt is a row with its timeline;
//! every piece of user text (names, reasons, output lines) is escaped, and
//! the page's Content-Security-Policy allows its own style block and
//! nothing else: no script runs, from anywhere.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use sha2::Digest;

use crate::explain::{explain, Explanation};
use crate::record::{Attempt, JobRecord, Phase, Shard};
use crate::report::{realized, Tails};

/// Output lines shown per failed step.
pub const FAILED_OUTPUT_LINES: usize = 40;
/// Failed attempts whose output the page shows (each listed with its reason).
pub const FAILED_OUTPUTS_SHOWN: usize = 20;
/// A 1,000-shard job's page stays under this (a test holds it to it).
pub const SIZE_BUDGET_AT_1000_SHARDS: usize = 1_500_000;

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
code,pre,td.id{font-family:ui-monospace,monospace;font-size:12px}\
.state{padding:.1em .5em;border-radius:.3em;color:#fff;background:#666}\
.SUCCEEDED{background:#2a7d3b}.FAILED{background:#b3261e}.CANCELLED,.REJECTED{background:#8a6d00}\
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}dt{color:#666}dd{margin:0}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:2px 6px;border-bottom:1px solid #eee;vertical-align:top}\
tr.failed td.result{color:#b3261e}td.bar{width:45%}svg{width:100%;height:12px;display:block}\
rect.boot{fill:#9bb7d4}rect.mount,rect.unmount{fill:#b9a0d6}rect.setup,rect.before_unmount{fill:#e0c36a}\
rect.run{fill:#3f8f4f}rect.failed{fill:#b3261e}rect.life{fill:#eee}\
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}\
.muted{color:#777}";

/// `text` safe in HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The policy: the style block by its hash, nothing else from anywhere.
fn content_security_policy() -> String {
    let hash = aws_smithy_types::base64::encode(sha2::Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; script-src 'none'; img-src 'none'; \
         base-uri 'none'; form-action 'none'"
    )
}

/// The page for `record`, with the kept output of its failed steps.
pub fn render(record: &JobRecord, tails: &Tails, now: DateTime<Utc>) -> String {
    let explanation = explain(record, now);
    let mut out = String::with_capacity(4096 + record.shards.len() * 700);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>flotilla job {} {}</title><style>{STYLE}</style></head><body>",
        content_security_policy(),
        escape(&record.job_id),
        crate::report::shown_state(record)
    );
    write_header(&mut out, record, &explanation);
    write_why(&mut out, &explanation);
    write_shards(&mut out, record, now);
    write_failures(&mut out, record, tails);
    write_snapshots(&mut out, record);
    write_trail(&mut out, &explanation);
    let _ = write!(
        out,
        "<footer class=\"muted\"><p>Written {} by Flotilla. The text report is report.txt beside this page.</p>\
         </footer></body></html>",
        now.format("%Y-%m-%d %H:%M:%S UTC")
    );
    out
}

fn write_header(out: &mut String, record: &JobRecord, explanation: &Explanation) {
    let name = record.spec.as_ref().and_then(|s| s.name.as_deref()).unwrap_or("-");
    let _ = write!(
        out,
        "<header><h1>job <code id=\"job-id\">{}</code> <span class=\"state {}\" id=\"job-state\">{}</span></h1>\
         <p id=\"summary\">{}</p><dl class=\"facts\">",
        escape(&record.job_id),
        crate::report::shown_state(record),
        crate::report::shown_state(record),
        escape(&explanation.summary)
    );
    let mut fact = |term: &str, value: String| {
        let _ = write!(out, "<dt>{term}</dt><dd>{}</dd>", escape(&value));
    };
    fact("name", name.to_string());
    fact("submitted", record.submitted_at.format("%Y-%m-%d %H:%M:%S UTC").to_string());
    if let Some(plan) = &record.plan {
        fact("fleet", format!("{} x {} ({})", plan.instance_count, plan.instance_type, plan.market.as_str()));
        fact("sizing", plan.sizing.clone());
        if let Some(e) = &plan.estimate {
            fact(
                "estimated cost",
                format!("${:.4} ({:.2} instance-hours; at most ${:.2})", e.total_usd, e.instance_hours, e.max_usd),
            );
        }
    }
    if let Some(hold) = &record.hold {
        let now = record.updated_at.unwrap_or(record.submitted_at);
        fact("debug hold", hold.describe(&record.job_id, now));
    }
    let spent = realized(record);
    let usd = spent.usd.map_or("unpriced".to_string(), |u| format!("${u:.4}"));
    fact("realized cost", format!("{usd} ({} instance-seconds, launch to terminate)", spent.instance_seconds));
    let own = crate::own_cost::price(&crate::own_cost::from_record(record));
    fact(
        "Flotilla's own cost",
        format!("{} ({} passes, {} record writes)", crate::own_cost::summary(&own), record.passes, record.writes),
    );
    let failed = record.shards.iter().filter(|s| s.result.as_ref().is_some_and(|r| !r.succeeded)).count();
    let attempts: usize = record.shards.iter().map(|s| s.attempts.len()).sum();
    fact("shards", format!("{} ({failed} failed, {attempts} attempts)", record.shards.len()));
    out.push_str("</dl></header>");
}

fn write_why(out: &mut String, explanation: &Explanation) {
    if explanation.findings.is_empty() {
        return;
    }
    out.push_str("<section id=\"why\"><h2>Why</h2><ul>");
    for finding in &explanation.findings {
        let shard = finding.shard.map(|s| format!("shard {s}: ")).unwrap_or_default();
        let _ = write!(out, "<li class=\"{}\">{}{}</li>", finding.kind, shard, escape(&finding.text));
    }
    out.push_str("</ul></section>");
}

/// The span every timeline is drawn on: submission to the last write.
struct Scale {
    start: DateTime<Utc>,
    seconds: f64,
}

impl Scale {
    fn of(record: &JobRecord, now: DateTime<Utc>) -> Self {
        let end = if crate::report::shown_state(record).is_terminal() { record.updated_at.unwrap_or(now) } else { now };
        let seconds = ((end - record.submitted_at).num_milliseconds() as f64 / 1000.0).max(1.0);
        Scale { start: record.submitted_at, seconds }
    }

    /// `at` plus `offset` seconds, as a position out of 1000.
    fn x(&self, at: DateTime<Utc>, offset: u32) -> f64 {
        let s = (at - self.start).num_milliseconds() as f64 / 1000.0 + f64::from(offset);
        (s / self.seconds * 1000.0).clamp(0.0, 1000.0)
    }
}

fn write_shards(out: &mut String, record: &JobRecord, now: DateTime<Utc>) {
    let scale = Scale::of(record, now);
    let _ = write!(
        out,
        "<section id=\"shards\"><h2>Shards and attempts</h2>\
         <p class=\"muted\">Each bar spans the job, {:.0} s from submission: launch to ready (blue), \
         then each step (mount and unmount purple, setup and before_unmount yellow, run green, a failed step red) \
         until the instance was released.</p>\
         <table><thead><tr><th>shard</th><th>attempt</th><th>instance</th><th>result</th><th>timeline</th></tr></thead><tbody>",
        scale.seconds
    );
    for shard in &record.shards {
        for attempt in &shard.attempts {
            write_attempt_row(out, record, shard, attempt, &scale);
        }
    }
    out.push_str("</tbody></table></section>");
}

fn write_attempt_row(out: &mut String, record: &JobRecord, shard: &Shard, attempt: &Attempt, scale: &Scale) {
    let launch = record.launch_of(attempt);
    let result = match (&attempt.end, &shard.result) {
        (Some(end), _) if end.detail.is_empty() => end.cause.as_str().to_string(),
        (Some(end), _) => format!("{}: {}", end.cause.as_str(), end.detail),
        (None, Some(r)) if r.succeeded => "Succeeded".to_string(),
        (None, Some(r)) => format!("Failed: {}", r.reason),
        (None, None) => format!("{:?}", attempt.stage),
    };
    let failed = attempt.end.as_ref().is_some_and(|e| e.cause != crate::record::EndCause::Succeeded);
    let _ = write!(
        out,
        "<tr class=\"attempt{}\" data-shard=\"{}\" data-attempt=\"{}\"><td>{}</td><td>{}</td>\
         <td class=\"id\">{} <span class=\"muted\">{} {} {}</span></td><td class=\"result\">{}</td><td class=\"bar\">",
        if failed { " failed" } else { "" },
        shard.index,
        attempt.number,
        shard.index,
        attempt.number,
        escape(attempt.instance_id.as_deref().unwrap_or("not launched")),
        escape(&launch.instance_type),
        launch.market.as_str(),
        escape(attempt.availability_zone.as_deref().unwrap_or("")),
        escape(&result)
    );
    write_bar(out, record, attempt, scale);
    out.push_str("</td></tr>");
}

/// The attempt's life as SVG rectangles (attributes, not styles: the
/// policy allows no inline style).
fn write_bar(out: &mut String, record: &JobRecord, attempt: &Attempt, scale: &Scale) {
    let Some(launched) = attempt.launched_at else {
        out.push_str("<span class=\"muted\">-</span>");
        return;
    };
    out.push_str("<svg viewBox=\"0 0 1000 12\" preserveAspectRatio=\"none\" role=\"img\">");
    let mut rect = |class: &str, from: u32, to: u32, title: String| {
        let (x0, x1) = (scale.x(launched, from), scale.x(launched, to));
        let _ = write!(
            out,
            "<rect class=\"{class}\" x=\"{x0:.1}\" y=\"0\" width=\"{:.1}\" height=\"12\"><title>{}</title></rect>",
            (x1 - x0).max(1.0),
            escape(&title)
        );
    };
    let life = attempt
        .billed_seconds
        .unwrap_or_else(|| (scale.seconds - (launched - scale.start).num_seconds() as f64).max(0.0) as u32);
    rect("life", 0, life, format!("instance up {life} s"));
    if let Some(ready) = attempt.ready_after {
        rect("boot", 0, ready, format!("launch to ready: {ready} s"));
    }
    for (phase, from, to) in &attempt.phase_times {
        rect(phase.as_str(), *from, *to, format!("{} {} s", phase.as_str(), to.saturating_sub(*from)));
    }
    for run in &attempt.phases {
        let after = |at| crate::record::seconds_after(Some(launched), at);
        // A finished phase's `opened_at` is compacted away; its batch's send time stands in.
        let opened = run.opened_at.or_else(|| record.commands.get(&run.batch).map(|b| b.dispatched_at));
        let (Some(from), to) = (after(opened), after(run.finished_at)) else { continue };
        let class = if run.succeeded() || run.exit_code.is_none() { run.phase.as_str() } else { "failed" };
        let code = run.exit_code.map(|c| format!(", exit {c}")).unwrap_or_default();
        rect(class, from, to.unwrap_or(life), format!("{}{code}", run.phase.as_str()));
    }
    out.push_str("</svg>");
}

/// The kept output of the failed steps, shown as text.
fn write_failures(out: &mut String, record: &JobRecord, tails: &Tails) {
    let failed: Vec<(u32, &Attempt, Phase)> = record
        .shards
        .iter()
        .flat_map(|s| s.attempts.iter().map(move |a| (s.index, a)))
        .filter_map(|(shard, a)| {
            let run = a.phases.iter().rev().find(|p| p.exit_code.is_some_and(|c| c != 0))?;
            Some((shard, a, run.phase))
        })
        .collect();
    if failed.is_empty() {
        return;
    }
    out.push_str("<section id=\"failures\"><h2>Output of failed steps</h2>");
    for (shard, attempt, phase) in failed.iter().take(FAILED_OUTPUTS_SHOWN) {
        let lines = tails.get(&(*shard, attempt.number, phase.as_str().to_string()));
        let shown = lines.map_or(&[][..], |l| &l[l.len().saturating_sub(FAILED_OUTPUT_LINES)..]);
        let _ = write!(
            out,
            "<h3>shard {shard}, attempt {}, {}</h3><pre class=\"output\" data-shard=\"{shard}\">",
            attempt.number,
            phase.as_str()
        );
        if shown.is_empty() {
            out.push_str("(no output kept)");
        }
        for line in shown {
            out.push_str(&escape(line));
            out.push('\n');
        }
        out.push_str("</pre>");
    }
    if failed.len() > FAILED_OUTPUTS_SHOWN {
        let _ = write!(
            out,
            "<p class=\"muted\">{} more failed steps: `flotilla logs`.</p>",
            failed.len() - FAILED_OUTPUTS_SHOWN
        );
    }
    out.push_str("</section>");
}

fn write_snapshots(out: &mut String, record: &JobRecord) {
    let snapshots = record.snapshots();
    if snapshots.is_empty() && record.pruned_snapshots.is_empty() {
        return;
    }
    out.push_str("<section id=\"snapshots\"><h2>Snapshots</h2><table><tbody>");
    for (volume, id) in &snapshots {
        let _ = write!(out, "<tr><td class=\"id\">{}</td><td>{}</td></tr>", escape(id), escape(volume));
    }
    out.push_str("</tbody></table>");
    if !record.pruned_snapshots.is_empty() {
        let _ = write!(out, "<p>Pruned past retention: {}</p>", escape(&record.pruned_snapshots.join(", ")));
    }
    out.push_str("</section>");
}

fn write_trail(out: &mut String, explanation: &Explanation) {
    out.push_str("<section id=\"trail\"><h2>Trail</h2><ol>");
    for line in &explanation.trail {
        let shard = line.shard.map(|s| format!("shard {s}: ")).unwrap_or_default();
        let _ = write!(out, "<li><time>{}</time> {shard}{}</li>", line.at.format("%H:%M:%S"), escape(&line.text));
    }
    out.push_str("</ol></section>");
}

/// The kept output of each failed step the page shows, from beside the record.
pub async fn failed_step_tails<O: crate::ports::Objects + ?Sized>(objects: &O, record: &JobRecord) -> Tails {
    let mut tails = Tails::new();
    let failed =
        record.shards.iter().flat_map(|s| s.attempts.iter().map(move |a| (s.index, a))).filter_map(|(shard, a)| {
            let run = a.phases.iter().rev().find(|p| p.exit_code.is_some_and(|c| c != 0))?;
            Some((shard, a.number, run.phase))
        });
    for (shard, attempt, phase) in failed.take(FAILED_OUTPUTS_SHOWN) {
        let key = format!("jobs/{}/{}", record.job_id, crate::record::output_name(shard, attempt, phase));
        if let Ok(Some(body)) = objects.get(&key).await {
            let lines = String::from_utf8_lossy(&body).lines().map(str::to_string).collect();
            tails.insert((shard, attempt, phase.as_str().to_string()), lines);
        }
    }
    tails
}

/// Render the job's page and write it beside its text report.
pub async fn write<L: crate::ports::Records + crate::ports::Objects + ?Sized>(
    ledger: &L,
    job_id: &str,
    now: DateTime<Utc>,
) -> crate::ports::CloudResult<bool> {
    let Some(loaded) = ledger.load(job_id).await? else { return Ok(false) };
    let tails = failed_step_tails(ledger, &loaded.record).await;
    let page = render(&loaded.record, &tails, now);
    ledger.put_artifact(job_id, "report.html", page.as_bytes(), "text/html; charset=utf-8").await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_is_escaped_everywhere() {
        let hostile = "</script><img src=x onerror=alert(1)>\"'&";
        let out = escape(hostile);
        assert!(!out.contains('<') && !out.contains('>') && !out.contains('"') && !out.contains('\''));
        assert_eq!(out, "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;");
    }

    #[test]
    fn the_policy_names_the_style_blocks_hash() {
        let policy = content_security_policy();
        assert!(policy.starts_with("default-src 'none'; style-src 'sha256-"), "{policy}");
        assert!(policy.contains("script-src 'none'"));
    }
}
