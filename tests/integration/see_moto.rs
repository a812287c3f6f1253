//! What a person sees: the CLI finding its deployment from a stack's
//! outputs on moto and listing jobs from the index; the HTML report of a
//! real job (a retry, a failed shard with hostile output) opened in
//! headless Chromium with the network blocked, asserted on its DOM and kept
//! as a screenshot; a 1,000-shard report in the same browser.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flotilla_cli::deployment::{Deployment, OUTPUTS};
use flotilla_cli::jobs;
use flotilla_shared::record::{JobRecord, JobState};
use serde_json::json;

use crate::lifecycle_moto::{all_running, gate_run, open_gate, pump_until};
use crate::moto::{job, workspace_root, MotoStack};

const LIMIT: std::time::Duration = std::time::Duration::from_secs(240);
const HOSTILE: &str = "</script><img src=x onerror=alert(1)>";

/// The output keys template.yaml declares, read from the template itself.
fn template_outputs() -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join("template.yaml")).expect("template");
    let outputs = text.split("\nOutputs:\n").nth(1).expect("an Outputs section");
    outputs
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.trim_end().ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':').to_string())
        .collect()
}

/// A stack on moto whose outputs are this test stack's resources, named as
/// template.yaml names them.
async fn stack_with_outputs(stack: &MotoStack, name: &str) {
    let value = |key: &str| match key {
        "JobsBucketName" => stack.bucket.clone(),
        "JobsQueueUrl" => stack.jobs_queue.clone(),
        "ReconcileQueueUrl" => stack.reconcile_queue.clone(),
        "NotifyQueueUrl" => stack.notify_queue.clone(),
        other => format!("https://sqs.us-east-1.amazonaws.com/123456789012/{other}"),
    };
    let mut outputs = serde_json::Map::new();
    for key in template_outputs() {
        outputs.insert(key.clone(), json!({"Value": value(&key)}));
    }
    let template = json!({
        "Resources": {"Handle": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
        "Outputs": outputs,
    });
    aws_sdk_cloudformation::Client::new(&stack.config)
        .create_stack()
        .stack_name(name)
        .template_body(template.to_string())
        .send()
        .await
        .expect("create stack");
}

/// `--stack` reads every output the CLI uses from the stack, and `ls`
/// lists jobs newest first from the index, filtered by state and name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_its_stack_and_lists_jobs_newest_first() {
    let stack = MotoStack::start().await;
    stack_with_outputs(&stack, "flotilla-prod").await;
    let deployment = Deployment::from_stack(&stack.config, "flotilla-prod").await.expect("the stack's outputs");
    assert_eq!(deployment.bucket().expect("bucket"), stack.bucket);
    assert_eq!(deployment.jobs_queue_url().expect("queue"), stack.jobs_queue);
    for queue in flotilla_cli::deployment::QUEUES {
        deployment.dead_letters(queue).expect("every DLQ is an output");
    }
    let declared = template_outputs();
    for (output, _) in OUTPUTS {
        assert!(declared.iter().any(|d| d == output), "template.yaml exports {output}");
    }
    let missing = Deployment::from_stack(&stack.config, "no-such-stack").await.err().expect("no stack");
    assert!(format!("{missing:#}").contains("no-such-stack"), "{missing:#}");

    let ports = stack.ports();
    let mut named = job("ls-b");
    named["name"] = json!("nightly");
    let mut bad = job("ls-c");
    bad["deadline_minutes"] = json!(0);
    for spec in [job("ls-a"), named, bad] {
        stack.submit(&spec.to_string()).await;
        stack.pump_once(&ports, false).await;
        // Distinct submission times, a millisecond apart at least.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ledger = deployment.ledger().expect("ledger");
    let all = jobs::Filter { state: None, name: None, limit: 20 };
    let listing = jobs::list(&deployment.s3(), &ledger, &stack.bucket, &all).await.expect("ls");
    let ids: Vec<&str> = listing.rows.iter().map(|r| r.record.job_id.as_str()).collect();
    assert_eq!(ids, ["ls-c", "ls-b", "ls-a"], "newest first");
    assert_eq!(listing.scanned, 3, "one index entry read per job listed");
    let rejected = jobs::Filter { state: Some(JobState::Rejected), name: None, limit: 20 };
    let listing = jobs::list(&deployment.s3(), &ledger, &stack.bucket, &rejected).await.expect("ls --state");
    assert_eq!(listing.rows.iter().map(|r| r.record.job_id.as_str()).collect::<Vec<_>>(), ["ls-c"]);
    let by_name = jobs::Filter { state: None, name: Some("nightly".into()), limit: 20 };
    let listing = jobs::list(&deployment.s3(), &ledger, &stack.bucket, &by_name).await.expect("ls --name");
    assert_eq!(listing.rows.iter().map(|r| r.record.job_id.as_str()).collect::<Vec<_>>(), ["ls-b"]);
    let one = jobs::Filter { state: None, name: None, limit: 1 };
    let listing = jobs::list(&deployment.s3(), &ledger, &stack.bucket, &one).await.expect("ls --limit 1");
    assert_eq!((listing.rows.len(), listing.scanned, listing.more), (1, 1, true), "a page costs a page");
    let json = jobs::listing_json(&listing, &stack.bucket, chrono::Utc::now());
    assert_eq!(json["jobs"][0]["jobId"], "ls-c");
}

/// What the page's loads went through: a proxy that answers the report's
/// own URL and refuses, and records, everything else.
struct Proxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn serving(pages: Vec<(String, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                let target = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                seen.lock().expect("lock").push(line.trim().to_string());
                let page = pages.iter().find(|(path, _)| target.ends_with(path.as_str()));
                let _ = match page {
                    Some((_, body)) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body))
                    }
                    None => {
                        stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    }
                };
            }
        });
        Proxy { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

/// Headless Chromium with every request through `proxy` (loopback too), no
/// background traffic; `what` is `--dump-dom` or `--screenshot=...`.
fn chromium(proxy: &Proxy, url: &str, what: &str) -> String {
    let profile = std::env::temp_dir().join(format!("flotilla-chromium-{}", std::process::id()));
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter",
            "--disable-client-side-phishing-detection",
            "--disable-domain-reliability",
            "--no-pings",
            "--window-size=1400,1800",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--proxy-server=http://127.0.0.1:{}", proxy.port),
            "--proxy-bypass-list=<-loopback>",
            what,
            url,
        ])
        .output()
        .expect("chromium runs (`make test` installs it from Debian's packages)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Chromium's own traffic, which no flag fully silences (network time,
/// component updates, account checks): Google's service hosts, never a
/// host the page names. Anything the page loads (`src=x` is
/// `http://flotilla-report.test/.../x`) is counted.
fn browser_background(request: &str) -> bool {
    let target = request.split_whitespace().nth(1).unwrap_or_default();
    let host = target.trim_start_matches("http://").split(['/', ':']).next().unwrap_or_default();
    request.is_empty()
        || ["google.com", "googleapis.com", "gvt1.com", "gstatic.com"]
            .iter()
            .any(|d| host == *d || host.ends_with(&format!(".{d}")))
}

/// The DOM's attempt rows, by `data-shard`.
fn attempt_rows(dom: &str) -> Vec<u32> {
    dom.match_indices("<tr class=\"attempt")
        .filter_map(|(at, _)| {
            let rest = &dom[at..];
            let value = rest.split("data-shard=\"").nth(1)?.split('"').next()?;
            value.parse().ok()
        })
        .collect()
}

/// Where the screenshot is kept: `.flotilla/report-screenshot.png`.
fn screenshot_path() -> PathBuf {
    let dir = workspace_root().join(".flotilla");
    std::fs::create_dir_all(&dir).expect("dir");
    dir.join("report-screenshot.png")
}

async fn a_job_with_a_retry_and_a_hostile_failure(stack: &MotoStack) -> JobRecord {
    let mut spec = job("seen-1");
    spec["name"] = json!("report-in-a-browser");
    spec["retry"] = json!({"attempts": 2});
    let go = gate_run(
        stack,
        &mut spec,
        &format!("if [ \"$FLOTILLA_SHARD_INDEX\" = 1 ]; then echo 'working'; echo '{HOSTILE}'; exit 3; fi; echo done"),
    );
    stack.submit(&spec.to_string()).await;
    let record = pump_until(stack, "seen-1", all_running).await;
    let victim = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("terminate");
    pump_until(stack, "seen-1", |r| r.shards[0].attempts.len() == 2).await;
    open_gate(stack, &go);
    let ports = stack.ports();
    let record = stack.run_to_end(&ports, "seen-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed, "{}", flotilla_shared::report::render(&record));
    record
}

/// The report of a real job of the local stack, as a browser shows it:
/// every shard and attempt, the hostile output line as text (no element it
/// could have made), no request beyond the page itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_shows_every_attempt_and_no_hostile_markup_in_chromium() {
    let stack = MotoStack::start().await;
    let record = a_job_with_a_retry_and_a_hostile_failure(&stack).await;
    let ports = stack.ports();
    let page = ports
        .ledger
        .get("jobs/seen-1/report.html")
        .await
        .expect("get")
        .expect("the reconciler wrote it beside report.txt");
    let text = String::from_utf8_lossy(&page);
    assert!(!text.contains(HOSTILE), "the hostile line is escaped in the file");

    let proxy = Proxy::serving(vec![("/seen-1/report.html".into(), page.clone())]);
    let url = "http://flotilla-report.test/seen-1/report.html";
    let dom = chromium(&proxy, url, "--dump-dom");
    let attempts: usize = record.shards.iter().map(|s| s.attempts.len()).sum();
    let rows = attempt_rows(&dom);
    assert_eq!(rows.len(), attempts, "one row per attempt: {rows:?}");
    assert!(attempts >= 3, "a retry happened: {attempts} attempts");
    for shard in &record.shards {
        assert!(rows.contains(&shard.index), "shard {} has rows", shard.index);
    }
    assert!(dom.contains("&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"), "shown as text");
    assert!(!dom.to_ascii_lowercase().contains("<img"), "no element made from output");
    assert!(!dom.contains("<script"), "no script at all");
    assert!(dom.contains("id=\"job-state\">FAILED<"), "the outcome");
    chromium(&proxy, url, &format!("--screenshot={}", screenshot_path().display()));
    let shot = std::fs::metadata(screenshot_path()).expect("a screenshot").len();
    assert!(shot > 10_000, "a screenshot of the page: {shot} bytes");
    let requests = proxy.requests();
    let other: Vec<&String> =
        requests.iter().filter(|r| !r.contains("/seen-1/report.html") && !browser_background(r)).collect();
    assert!(other.is_empty(), "requests beyond the page: {other:?}");
}

/// A 1,000-shard job's page: 1,000 rows in the browser, under its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_shard_report_has_a_row_each_and_stays_small() {
    let cloud = crate::scenarios::cloud();
    let mut spec = job("big-report");
    spec["fleet"] = json!({"count": 1000});
    let record = crate::scenarios::run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded);
    let page = flotilla_shared::report_html::render(&record, &Default::default(), chrono::Utc::now());
    assert!(
        page.len() < flotilla_shared::report_html::SIZE_BUDGET_AT_1000_SHARDS,
        "{} bytes at 1,000 shards",
        page.len()
    );
    println!("1,000-shard report: {} bytes", page.len());
    let proxy = Proxy::serving(vec![("/big/report.html".into(), page.into_bytes())]);
    let dom = chromium(&proxy, "http://flotilla-report.test/big/report.html", "--dump-dom");
    let rows = attempt_rows(&dom);
    assert_eq!(rows.len(), 1000);
    let distinct: std::collections::BTreeSet<u32> = rows.into_iter().collect();
    assert_eq!(distinct.len(), 1000, "every shard");
    assert!(dom.contains("<rect class=\"run\""), "timelines drawn");
}

/// `flotilla plan --spot-history` prices a GPU job from the Region's spot
/// price history (the dearest zone over the window, including the price in
/// force at its start), says so, and judges `budget_usd` as intake does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_prices_a_gpu_job_from_spot_history_and_says_so() {
    use flotilla_cli::plan_view::{priced_plan, PlanOptions};
    let stack = MotoStack::start().await;
    stack_with_outputs(&stack, "flotilla-gpu").await;
    let deployment = Deployment::from_stack(&stack.config, "flotilla-gpu").await.expect("the stack's outputs");
    // us-east-1a's 0.45 changed 30 h ago, so it is the price in force at the
    // window's start; 0.52 is within the window; 0.61 is older than both and
    // superseded; p3 is another type.
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(
        stack.scratch.join("spot-prices"),
        "g5.xlarge us-east-1a 0.6100 40\ng5.xlarge us-east-1a 0.4500 30\ng5.xlarge us-east-1b 0.5200 3\n\
         g5.xlarge us-east-1b 0.3900 1\np3.2xlarge us-east-1a 2.0000 1\n",
    )
    .expect("spot prices");
    let mut spec = job("gpu-plan");
    spec["instance_types"] = json!(["g5.xlarge"]);
    spec["market"] = json!("spot");
    spec["fleet"] = json!({"count": 4});
    spec["deadline_minutes"] = json!(60);
    spec["budget_usd"] = json!(10.0);
    let path = stack.scratch.join("gpu.json");
    std::fs::write(&path, spec.to_string()).expect("spec");

    let table = PlanOptions { prices: None, spot_history: false };
    let (_, plan, priced) = priced_plan(&deployment, &path, table).await.expect("plan from the table");
    let e = plan.estimate.expect("g5.xlarge is in the table");
    assert_eq!(e.hourly_usd["g5.xlarge"], 1.006);
    assert!(e.spot_price_from.starts_with("a fixed fraction: 0.4 x on-demand"), "{}", e.spot_price_from);
    assert!(!priced.shown_differs);

    let history = PlanOptions { prices: None, spot_history: true };
    let (_, plan, priced) = priced_plan(&deployment, &path, history).await.expect("plan from the history");
    let e = plan.estimate.expect("priced");
    assert_eq!(e.spot_hourly_usd["g5.xlarge"], 0.52, "the dearest zone in the window");
    assert!(e.spot_price_from.starts_with("DescribeSpotPriceHistory in us-east-1"), "{}", e.spot_price_from);
    assert!(e.spot_price_from.contains("2 Availability Zone(s) in the 24 h"), "{}", e.spot_price_from);
    // Intake judges the budget with its own table: plan reports that figure.
    assert!(priced.shown_differs);
    let intake_total = priced.intake_total.expect("intake's estimate");
    assert!((intake_total - e.total_usd).abs() > 0.01, "the history moved the estimate: {intake_total} vs {e:?}");

    // A budget intake would refuse is refused by plan, whatever it shows.
    spec["budget_usd"] = json!(0.5);
    std::fs::write(&path, spec.to_string()).expect("spec");
    let again = PlanOptions { prices: None, spot_history: true };
    let err = priced_plan(&deployment, &path, again).await.err().expect("over budget");
    assert!(format!("{err}").contains("above the budget $0.50"), "{err}");

    // The deployment's own table (config/prices.json) is the one intake
    // prices with: plan reads it too, so the two give one verdict and one
    // figure for a budget the built-in table alone would let through.
    spec["budget_usd"] = json!(10.0);
    spec["id"] = json!("gpu-dear");
    std::fs::write(&path, spec.to_string()).expect("spec");
    flotilla_shared::aws::s3_client(&stack.config)
        .put_object()
        .bucket(&stack.bucket)
        .key(flotilla_shared::intake::PRICES_KEY)
        .body(br#"{"instance_hour": {"g5.xlarge": 8.0}}"#.to_vec().into())
        .send()
        .await
        .expect("the deployment's table");
    let table = PlanOptions { prices: None, spot_history: false };
    let planned = priced_plan(&deployment, &path, table).await.err().expect("over budget at the deployment's prices");
    let planned = format!("{planned}");
    assert!(planned.contains("the estimate is $13.01"), "{planned}");
    let ports = stack.ports();
    stack.submit(&spec.to_string()).await;
    stack.pump_once(&ports, false).await;
    let record = stack.record(&ports, "gpu-dear").await.expect("a record");
    assert_eq!(record.state, JobState::Rejected);
    let reason = record.reason.clone();
    assert!(planned.ends_with(&reason), "plan said {planned:?}, intake {reason:?}");
}

/// `logs --follow` shows a running step as it writes: the reconciler sends
/// every step with CloudWatchOutputConfig, and the agent streams its lines
/// to the step log group long before the S3 copy exists (that comes only
/// when the step ends); the rest of the whole output follows from S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_reads_a_running_step_from_its_stream_before_it_ends() {
    use flotilla_cli::logs::{after_printed, output, steps, Live, Selection};
    let stack = MotoStack::start().await;
    let mut spec = job("live-1");
    spec["fleet"] = json!({"count": 1});
    let go = gate_run(&stack, &mut spec, "echo 'after the gate'");
    let gated = spec["run"]["script"].as_str().expect("script").to_string();
    spec["run"]["script"] = json!(format!("echo 'first line'; echo; echo 'second line'; {gated}"));
    stack.submit(&spec.to_string()).await;
    pump_until(&stack, "live-1", all_running).await;

    let live = Live::new(&stack.config, crate::moto::STEP_LOG_GROUP);
    let ledger =
        flotilla_shared::aws::s3::S3Ledger::new(flotilla_shared::aws::s3_client(&stack.config), stack.bucket.clone());
    let s3 = flotilla_shared::aws::s3_client(&stack.config);
    let ports = stack.ports();
    let selection = Selection { shard: None, phase: Some("run".into()) };
    let mut token = None;
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !seen.iter().any(|l| l == "second line") {
        assert!(std::time::Instant::now() < deadline, "the running step's lines never streamed: {seen:?}");
        let record = stack.record(&ports, "live-1").await.expect("record");
        let step = steps(&record, &selection).pop().expect("the run step");
        assert!(!step.ended, "the step ended while its gate was shut");
        seen.extend(live.next_lines(&step, &mut token).await.expect("stream"));
        if seen.is_empty() {
            // Nothing in the bucket yet either: the agent uploads at the end.
            assert_eq!(output(&s3, &ledger, "live-1", &step).await.expect("output"), None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(seen, ["first line", "second line"], "line by line, empty lines aside");

    open_gate(&stack, &go);
    let record = stack.run_to_end(&ports, "live-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let step = steps(&record, &selection).pop().expect("the run step");
    let whole = output(&s3, &ledger, "live-1", &step).await.expect("output").expect("the S3 copy");
    assert_eq!(after_printed(&whole, 2), "after the gate\n", "the rest, after what streamed: {whole:?}");
}
