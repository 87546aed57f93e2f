//! One worker per site: it owns the site's lifetime lock, waits for wake-ups (marker
//! events, root events, timers), and does the work on a blocking thread while holding the
//! site's operation lock, so CLI commands interleave safely between jobs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::MissedTickBehavior;

use crate::error::{Error, Result};
use crate::fsops::{self, Lock};
use crate::heal;
use crate::pipeline;
use crate::release::store::Journal;
use crate::service::watcher::Watcher;
use crate::site::Site;
use crate::upload::marker;
use crate::verify;

/// How a worker reports its first pass to the supervisor.
pub type Ready = mpsc::UnboundedSender<(String, Result<()>)>;

/// The handles the supervisor keeps for a running worker.
pub struct Handle {
    /// The site's config, to detect changes on reload.
    pub site: Site,
    /// Asks the worker to exit after its current job.
    pub stop: Arc<Notify>,
    /// Wakes a healing pass (SIGHUP).
    pub heal: Arc<Notify>,
    /// The worker task.
    pub join: tokio::task::JoinHandle<()>,
}

/// What a wake-up asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// The healing pass at start, without processing uploads.
    FirstHeal,
    /// A marker was just closed or renamed into place.
    Uploads,
    /// Look for a marker (start-up, a young marker to re-check) and pending claims.
    Rescan,
    Heal,
    Verify,
}

/// Starts the worker of `site`.
pub fn spawn(site: Site, watcher: Arc<Watcher>, cancel: Arc<AtomicBool>, ready: Ready) -> Handle {
    let stop = Arc::new(Notify::new());
    let heal = Arc::new(Notify::new());
    let join = tokio::spawn(run(
        site.clone(),
        watcher,
        cancel,
        ready,
        Arc::clone(&stop),
        Arc::clone(&heal),
    ));
    Handle {
        site,
        stop,
        heal,
        join,
    }
}

async fn run(
    site: Site,
    watcher: Arc<Watcher>,
    cancel: Arc<AtomicBool>,
    ready: Ready,
    stop: Arc<Notify>,
    heal_wake: Arc<Notify>,
) {
    let name = site.name().to_string();
    let marker_wake = Arc::new(Notify::new());
    let mut ready = Some(ready);
    let mut report = |r: Result<()>| {
        if let Some(tx) = ready.take() {
            let _ = tx.send((name.clone(), r));
        }
    };

    // A root that does not exist yet is waited for; its parent is watched so it is
    // picked up as soon as it appears, with the heal timer as a backstop.
    if !site.root_exists() {
        tracing::warn!(site = site.name(), root = %site.root().display(),
            "site root does not exist yet; waiting for it");
        crate::service::set_status(&site, "waiting for its root");
        report(Ok(()));
        if let Some(parent) = site.root().parent() {
            if let Err(e) = watcher.watch(parent, None, Arc::clone(&heal_wake)) {
                tracing::warn!(site = site.name(), error = %e, "cannot watch the root's parent");
            }
        }
        while !site.root_exists() {
            tokio::select! {
                _ = stop.notified() => return,
                _ = heal_wake.notified() => {},
                _ = tokio::time::sleep(site.cfg.heal_interval) => {},
            }
            if cancel.load(Ordering::Relaxed) {
                return;
            }
        }
    }

    let lifetime = match take_lifetime_lock(&site) {
        Ok(l) => l,
        Err(e) => {
            report(Err(e));
            return;
        }
    };
    let watch = |site: &Site| {
        for (dir, name, wake) in [
            (
                site.deploy_cache(),
                Some(site.cfg.marker.as_str()),
                &marker_wake,
            ),
            (site.root().to_path_buf(), None, &heal_wake),
            (site.releases(), None, &heal_wake),
        ] {
            if let Err(e) = watcher.watch(&dir, name, Arc::clone(wake)) {
                tracing::error!(site = site.name(), error = %e, "cannot watch");
            }
        }
    };
    // First pass: heal, then whatever markers arrived while the service was stopped.
    // The first pass only heals, so READY=1 is not held back by redoing a big interrupted
    // upload (systemd would time the start out); pending claims follow right after.
    let first = work(&site, &cancel, Job::FirstHeal).await;
    watch(&site);
    report(first.map(|_| ()));
    let rescan_wake = Arc::new(Notify::new());
    work_logged(&site, &cancel, Job::Rescan).await;
    recheck_young_marker(&site, &rescan_wake);

    let mut heal_tick = tokio::time::interval(site.cfg.heal_interval);
    heal_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    heal_tick.tick().await;
    let mut verify_tick = tokio::time::interval(site.cfg.verify_interval);
    verify_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    verify_tick.tick().await;
    loop {
        let job = tokio::select! {
            _ = stop.notified() => break,
            _ = marker_wake.notified() => Job::Uploads,
            _ = rescan_wake.notified() => Job::Rescan,
            _ = heal_wake.notified() => Job::Heal,
            _ = heal_tick.tick() => Job::Heal,
            _ = verify_tick.tick() => Job::Verify,
        };
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        if job == Job::Heal {
            // A recreated deploy-cache/ needs a new watch.
            watch(&site);
        }
        work_logged(&site, &cancel, job).await;
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        recheck_young_marker(&site, &rescan_wake);
    }
    watcher.forget(&marker_wake);
    watcher.forget(&heal_wake);
    drop(lifetime);
}

/// A marker a scan left because it was still young gets a second look once settled
/// (its close-write event, if it is still being written, wakes the worker anyway).
fn recheck_young_marker(site: &Site, rescan: &Arc<Notify>) {
    if std::fs::symlink_metadata(site.marker()).is_ok() {
        let rescan = Arc::clone(rescan);
        tokio::spawn(async move {
            tokio::time::sleep(marker::MARKER_SETTLE).await;
            rescan.notify_one();
        });
    }
}

fn take_lifetime_lock(site: &Site) -> Result<Lock> {
    site.ensure_layout()?;
    heal::repair_locks(site, false)?;
    fsops::lock(&site.service_lock(), Some(Duration::ZERO))?.ok_or_else(|| {
        Error::Failed(format!(
            "another release-keeper service is already running for site {} ({} is locked)",
            site.name(),
            site.service_lock().display()
        ))
    })
}

async fn work_logged(site: &Site, cancel: &Arc<AtomicBool>, job: Job) {
    if let Err(e) = work(site, cancel, job).await {
        if !matches!(e, Error::Interrupted) {
            tracing::error!(site = site.name(), error = %e, job = ?job, "work failed");
        }
    }
}

async fn work(site: &Site, cancel: &Arc<AtomicBool>, job: Job) -> Result<()> {
    let site = site.clone();
    let cancel = Arc::clone(cancel);
    tokio::task::spawn_blocking(move || work_blocking(&site, &cancel, job))
        .await
        .map_err(|e| Error::Failed(format!("worker task failed: {e}")))?
}

fn work_blocking(site: &Site, cancel: &AtomicBool, job: Job) -> Result<()> {
    heal::repair_locks(site, false)?;
    // Wait for a CLI command holding the lock, but stay responsive to shutdown.
    let _lock = loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if let Some(l) = fsops::lock(&site.op_lock(), Some(Duration::from_millis(200)))? {
            break l;
        }
    };
    let doing = match job {
        Job::Heal | Job::FirstHeal => "healing",
        Job::Uploads | Job::Rescan => "processing uploads",
        Job::Verify => "verifying",
    };
    crate::service::set_status(site, doing);
    let result = run_job(site, cancel, job);
    crate::service::set_status(site, "idle");
    // Still under the operation lock, so the journal is not changing underneath.
    crate::metrics::update(site);
    result
}

fn run_job(site: &Site, cancel: &AtomicBool, job: Job) -> Result<()> {
    match job {
        Job::FirstHeal => {
            heal::heal(site, &mut Journal::load(site)?, false)?;
        }
        Job::Heal => {
            let mut journal = Journal::load(site)?;
            heal::heal(site, &mut journal, false)?;
            pipeline::run_pending(site, cancel, false)?;
        }
        Job::Uploads => {
            pipeline::run_pending(site, cancel, true)?;
        }
        Job::Rescan => {
            pipeline::run_pending(site, cancel, false)?;
        }
        Job::Verify => {
            if let Some(id) = site.current_id() {
                let report = verify::verify_release(site, &id)?;
                verify::record(site, &report)?;
            }
        }
    }
    Ok(())
}
