//! The deployment's tunables, read from the environment by the functions
//! (`aws::Environment`) and set directly by the tests and the simulator.

/// Tunables read from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Delay between polls while something is under way.
    pub poll_delay_seconds: u32,
    /// How long instances may live past the job deadline before the reaper may kill them.
    pub expiry_grace_minutes: u32,
    /// The bound on a job's bill: every instance is terminated by the
    /// deadline, or the cancel's arrival, plus this (1-60 min). Cleanup
    /// steps get what is left of it.
    pub cleanup_grace_minutes: u32,
    /// The deployment's worker instance profile, for specs that name none.
    pub worker_instance_profile: Option<String>,
    /// How long a pass may work before it saves and re-queues itself.
    pub pass_budget_seconds: u32,
    /// An agent not Online this long after launch, or silent this long while
    /// its instance works, counts as a lost instance.
    pub agent_timeout_seconds: u32,
    /// Working instances' agents and status checks are looked at this often,
    /// not every pass: at 1,000 instances one check is 20 + 10 calls.
    pub health_check_seconds: u32,
    /// An instance whose status checks stay `impaired` this long is replaced
    /// (EC2 checks every minute; a system check may recover on its own).
    pub impaired_timeout_seconds: u32,
    /// The reaper acts on an orphan only once its mark is this old: less
    /// than the reaper's period, so the next pass acts.
    pub reaper_mark_grace_seconds: u32,
    /// The reaper plans and reports, and changes nothing.
    pub reaper_dry_run: bool,
    /// While shards work, a job is polled this often: EC2 and SSM events
    /// move it on, so this is the safety net (default: the poll delay;
    /// template.yaml's SafetyPollSeconds, where the rules deliver events).
    pub safety_poll_seconds: Option<u32>,
    /// Launches take turns through one token bucket in the jobs bucket
    /// (`admission.rs`), so jobs launching at once do not throttle each other.
    pub launch_admission: bool,
    /// The deployment's name (`flotilla:stack` on everything it creates).
    pub stack: String,
    /// Roles in the accounts `role_arn` jobs use, which the reaper assumes
    /// to reap orphans there too.
    pub reaper_roles: Vec<String>,
    /// This deployment's account and Region, when known (in Lambda).
    pub account_id: Option<String>,
    pub region: Option<String>,
    /// Limits the deployment puts on every job (template parameters).
    pub limits: crate::spec::Limits,
    /// The log group SSM streams step output to while it runs
    /// (CloudWatchOutputConfig), for `flotilla logs --follow`.
    pub step_log_group: Option<String>,
}

impl Settings {
    /// The safety-net poll while shards work: the poll delay unless set.
    pub fn safety_poll(&self) -> u32 {
        self.safety_poll_seconds.unwrap_or(self.poll_delay_seconds)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            poll_delay_seconds: 20,
            expiry_grace_minutes: 30,
            cleanup_grace_minutes: 15,
            worker_instance_profile: None,
            pass_budget_seconds: 50,
            agent_timeout_seconds: 900,
            health_check_seconds: 60,
            impaired_timeout_seconds: 300,
            reaper_mark_grace_seconds: 240,
            reaper_dry_run: false,
            safety_poll_seconds: None,
            launch_admission: false,
            stack: "flotilla".to_string(),
            reaper_roles: vec![],
            account_id: None,
            region: None,
            limits: crate::spec::Limits::default(),
            step_log_group: None,
        }
    }
}
