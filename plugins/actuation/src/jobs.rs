//! Bulk commands: one command to every device of a group, a list, or a SQL query's result,
//! run as a job with a bound on commands in flight, progress, and a stop when the failure
//! rate passes a threshold (a bad configuration should not brick a whole fleet).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferrite_engine::auth::{Principal, RequestContext};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::command::Status;
use crate::error::{Error, Result};
use crate::service::{Actuation, CommandRequest, now_ms};

/// Most devices one job may target.
pub const MAX_TARGETS: usize = 100_000;

/// Which devices a job reaches.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// Every device of a group.
    Group(String),
    /// These devices.
    Devices(Vec<String>),
    /// The `device_id` column of a read-only query over the tenant's tables
    /// (`SELECT device_id FROM devices WHERE firmware < '2.3'`).
    Sql(String),
}

/// A job as a client asks for it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The command every device gets.
    pub command: CommandRequest,
    /// Which devices.
    pub target: Target,
    /// Most commands in flight (sent, not yet answered) at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Stop when failed, refused and expired commands pass this share of finished ones.
    #[serde(default = "default_failure_rate")]
    pub max_failure_rate: f64,
    /// Finished commands needed before the failure rate is judged.
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
}

fn default_concurrency() -> usize {
    50
}
fn default_failure_rate() -> f64 {
    0.2
}
fn default_min_samples() -> usize {
    10
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Sending commands.
    Running,
    /// Every device was sent its command and every command ended.
    Completed,
    /// Stopped at the failure threshold (or by a client); the devices not reached yet get
    /// nothing.
    Stopped,
}

/// A job's progress.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobView {
    /// Its id.
    pub id: String,
    /// The command's name.
    pub command: String,
    /// Where it is.
    pub status: JobStatus,
    /// Why it stopped, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Devices targeted.
    pub total: usize,
    /// Commands accepted so far.
    pub sent: usize,
    /// Answered `succeeded`.
    pub succeeded: usize,
    /// Answered `failed`.
    pub failed: usize,
    /// Expired without an answer.
    pub expired: usize,
    /// Refused by a limit or a policy (never sent).
    pub refused: usize,
    /// Accepted and not yet ended.
    pub in_flight: usize,
    /// Started, milliseconds since the epoch.
    pub created_at: i64,
}

struct Job {
    tenant: String,
    view: Mutex<JobView>,
    stop: AtomicBool,
}

/// Every job of this run (jobs live in memory; their commands are durable).
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("jobs", &self.jobs.lock().len()).finish()
    }
}

impl Jobs {
    /// Starts a job over `devices` (already resolved from its target); its first view.
    pub fn start(
        self: &Arc<Self>,
        actuation: Arc<Actuation>,
        sender: Principal,
        context: RequestContext,
        tenant: &str,
        request: JobRequest,
        devices: Vec<String>,
    ) -> Result<JobView> {
        if devices.is_empty() {
            return Err(Error::Invalid("the target holds no device".into()));
        }
        if devices.len() > MAX_TARGETS {
            return Err(Error::Invalid(format!("{} devices, over the limit of {MAX_TARGETS} per job", devices.len())));
        }
        if request.concurrency == 0 || request.concurrency > 10_000 {
            return Err(Error::Invalid("concurrency must be between 1 and 10000".into()));
        }
        if !(0.0..=1.0).contains(&request.max_failure_rate) {
            return Err(Error::Invalid("max_failure_rate must be between 0 and 1".into()));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let view = JobView {
            id: id.clone(),
            command: request.command.name.clone(),
            status: JobStatus::Running,
            reason: None,
            total: devices.len(),
            sent: 0,
            succeeded: 0,
            failed: 0,
            expired: 0,
            refused: 0,
            in_flight: 0,
            created_at: now_ms(),
        };
        let job =
            Arc::new(Job { tenant: tenant.to_owned(), view: Mutex::new(view.clone()), stop: AtomicBool::new(false) });
        self.jobs.lock().insert(id, job.clone());
        let tenant = tenant.to_owned();
        tokio::spawn(async move { run(job, actuation, sender, context, tenant, request, devices).await });
        Ok(view)
    }

    /// Job `id` of `tenant`.
    pub fn get(&self, tenant: &str, id: &str) -> Result<JobView> {
        let job = self.jobs.lock().get(id).cloned().filter(|j| j.tenant == tenant);
        job.map(|j| j.view.lock().clone()).ok_or_else(|| Error::NotFound(format!("no job {id:?}")))
    }

    /// Stops job `id` of `tenant`: no further device gets its command.
    pub fn stop(&self, tenant: &str, id: &str) -> Result<JobView> {
        let job = self.jobs.lock().get(id).cloned().filter(|j| j.tenant == tenant);
        let job = job.ok_or_else(|| Error::NotFound(format!("no job {id:?}")))?;
        job.stop.store(true, Ordering::Relaxed);
        let mut v = job.view.lock();
        if v.status == JobStatus::Running {
            v.reason = Some("stopped by a client".into());
        }
        Ok(v.clone())
    }
}

async fn run(
    job: Arc<Job>,
    actuation: Arc<Actuation>,
    sender: Principal,
    context: RequestContext,
    tenant: String,
    request: JobRequest,
    devices: Vec<String>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(request.concurrency));
    let mut waits = tokio::task::JoinSet::new();
    for device in devices {
        if job.stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        if job.stop.load(Ordering::Relaxed) {
            break;
        }
        let label = format!("job::{:?}", job.view.lock().id);
        match actuation.submit_watched(&sender, Some(&label), &context, &tenant, &device, request.command.clone()).await
        {
            Ok((_, done)) => {
                {
                    let mut v = job.view.lock();
                    v.sent += 1;
                    v.in_flight += 1;
                }
                let (job, threshold, min) = (job.clone(), request.max_failure_rate, request.min_samples);
                waits.spawn(async move {
                    let status = done.await.map_or(Status::Expired, |(s, _)| s);
                    drop(permit);
                    settle(&job, Some(status), threshold, min);
                });
            }
            Err(_) => {
                drop(permit);
                settle(&job, None, request.max_failure_rate, request.min_samples);
            }
        }
    }
    while waits.join_next().await.is_some() {}
    let mut v = job.view.lock();
    if v.status == JobStatus::Running {
        v.status = if job.stop.load(Ordering::Relaxed) { JobStatus::Stopped } else { JobStatus::Completed };
    }
}

/// Counts one finished command (`None`: refused) and stops the job past its threshold.
fn settle(job: &Job, status: Option<Status>, threshold: f64, min_samples: usize) {
    let mut v = job.view.lock();
    match status {
        None => v.refused += 1,
        Some(s) => {
            v.in_flight = v.in_flight.saturating_sub(1);
            match s {
                Status::Succeeded => v.succeeded += 1,
                Status::Failed => v.failed += 1,
                _ => v.expired += 1,
            }
        }
    }
    let bad = v.failed + v.expired + v.refused;
    let finished = bad + v.succeeded;
    if finished >= min_samples && bad as f64 > threshold * finished as f64 && !job.stop.load(Ordering::Relaxed) {
        job.stop.store(true, Ordering::Relaxed);
        v.status = JobStatus::Stopped;
        v.reason = Some(format!(
            "{bad} of {finished} finished commands failed, were refused or expired: over the threshold of {:.0}%",
            threshold * 100.0
        ));
    }
}
