//! The service (`run`): one worker per site, the shared inotify watcher, signals
//! (SIGTERM/SIGINT stop, SIGHUP reloads and heals), and systemd notification.

pub mod systemd;
pub mod watcher;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{self, SiteConfig};
use crate::error::{Error, IoContext, Result};
use crate::events;
use crate::fsops;
use crate::site::Site;
use watcher::Watcher;

/// Name of the site served by `run --root`.
pub const DEFAULT_SITE: &str = "default";

/// Where the sites come from.
enum Source {
    /// A config file (reloadable).
    Config(PathBuf),
    /// `run --root DIR`: one site, built-in defaults ([`root_config`]).
    Root(config::Config),
}

impl Source {
    fn load(&self) -> Result<BTreeMap<String, Site>> {
        let cfg = match self {
            Source::Config(path) => config::load(path)?,
            Source::Root(cfg) => cfg.clone(),
        };
        Ok(cfg
            .sites
            .into_iter()
            .map(|(n, c)| (n, Site::new(c)))
            .collect())
    }
}

/// The one site `--root DIR` stands for, for `run` and for the commands on a site: named
/// [`DEFAULT_SITE`], built-in defaults, no config file. An explicit `--config`
/// (`config_flag`) beside it is refused: silently ignoring it would run deploys without
/// the hooks and health check the operator configured there. (RELEASE_KEEPER_CONFIG is
/// ambient, e.g. set for the unit, and stays ignored.) A DIR that is a file is a wrong
/// argument (exit 2), as a config `root` that is not a directory is.
pub fn root_config(root: &Path, config_flag: Option<&Path>) -> Result<config::Config> {
    if config_flag.is_some() {
        return Err(Error::Usage(
            "--root DIR serves one site with built-in defaults and no config file; it \
             cannot be combined with --config (drop --root to use the config)"
                .into(),
        ));
    }
    let abs = std::path::absolute(root).at(root)?;
    if let Some(why) = config::root_not_a_directory(&abs) {
        return Err(Error::Usage(format!(
            "--root {}: {why}; give a site's root directory, or a path to create",
            root.display()
        )));
    }
    Ok(config::Config {
        path: abs.clone(),
        sites: BTreeMap::from([(
            DEFAULT_SITE.to_string(),
            SiteConfig::with_defaults(DEFAULT_SITE, abs),
        )]),
        from_root: true,
    })
}

static STATUS: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();

/// Updates this site's part of the systemd `STATUS=` line: what the site is doing and
/// its current release, e.g. `shop: idle, current v42; blog: healing, current 2026...Z`.
pub fn set_status(site: &Site, doing: &str) {
    // Outside systemd nobody reads the line: not even `current` is looked up for it.
    if !systemd::enabled() {
        return;
    }
    let line = match site.current_id() {
        Some(id) => format!("{}: {doing}, current {id}", site.name()),
        None => format!("{}: {doing}, no release yet", site.name()),
    };
    let map = STATUS.get_or_init(|| Mutex::new(BTreeMap::new()));
    if let Ok(mut m) = map.lock() {
        m.insert(site.name().to_string(), line);
        systemd::status(&m.values().cloned().collect::<Vec<_>>().join("; "));
    }
}

/// Drops a stopped site from the `STATUS=` line (a replacement worker adds it back).
fn forget_status(name: &str) {
    if let Some(Ok(mut m)) = STATUS.get().map(Mutex::lock) {
        m.remove(name);
        systemd::status(&m.values().cloned().collect::<Vec<_>>().join("; "));
    }
}

/// Runs the service until SIGTERM/SIGINT.
pub fn run(config_flag: Option<&Path>, root: Option<&Path>) -> Result<()> {
    let source = match root {
        Some(r) => {
            let cfg = root_config(r, config_flag)?;
            fsops::ensure_dir(&cfg.path, 0o755)?;
            Source::Root(cfg)
        }
        None => Source::Config(config::resolve_path(config_flag)),
    };
    let sites = source.load()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .at(Path::new("tokio runtime"))?;
    rt.block_on(supervise(source, sites))
}

async fn supervise(source: Source, sites: BTreeMap<String, Site>) -> Result<()> {
    let watcher = Watcher::new()?;
    let mut term = signal(SignalKind::terminate()).at(Path::new("SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).at(Path::new("SIGINT"))?;
    let mut hup = signal(SignalKind::hangup()).at(Path::new("SIGHUP"))?;

    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut workers: BTreeMap<String, worker::Handle> = BTreeMap::new();
    // The sites whose worker is still the one started with the service: their refusal
    // ends the service even once it has started (see below).
    let mut from_start: BTreeSet<String> = sites.keys().cloned().collect();
    let mut retiring: BTreeMap<String, Retiring> = BTreeMap::new();
    for (name, site) in sites {
        workers.insert(
            name,
            worker::spawn(site, Arc::clone(&watcher), ready_tx.clone()),
        );
    }
    // systemd's watchdog runs from the start: fed during the first pass and shutdown too.
    let _watchdog = systemd::Watchdog::start();
    let mut waiting = workers.len();
    // A first pass that resumes an activation a crash interrupted runs its hooks and
    // health check again before READY=1: past a moment, systemd is told the start may
    // take as long as the longest activation, or TimeoutStartSec would kill it halfway.
    let slow_start = tokio::time::sleep(SLOW_START);
    tokio::pin!(slow_start);
    let mut extended = false;
    while waiting > 0 {
        tokio::select! {
            _ = &mut slow_start, if !extended => {
                extended = true;
                let longest = workers
                    .values()
                    .map(|h| crate::activate::longest(&h.site.cfg))
                    .max()
                    .unwrap_or_default();
                systemd::extend_timeout(longest.saturating_add(STOP_MARGIN));
            }
            msg = ready_rx.recv() => {
                let Some((name, res)) = msg else { break };
                waiting -= 1;
                if let Err(e) = res {
                    tracing::error!(event = crate::events::SITE_ERROR, site = %name, reason = %e, "site failed to start");
                    stop_all(&mut workers).await;
                    return Err(e);
                }
            }
            _ = term.recv() => return shutdown(&mut workers, &mut retiring).await,
            _ = int.recv() => return shutdown(&mut workers, &mut retiring).await,
        }
    }
    tracing::info!(
        event = events::DAEMON_STARTED,
        site = %site_names(&workers),
        sites = workers.len(),
        "release-keeper started"
    );
    warn_if_no_sites(&source, workers.len());
    systemd::ready();

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                systemd::reloading();
                let stopped =
                    reload(&source, &mut workers, &mut retiring, &watcher, &ready_tx).await;
                // A changed site's worker is the reload's now.
                from_start.retain(|n| !stopped.contains(n));
                systemd::ready();
            }
            // A worker a reload stopped has finished what it was doing: its site, if
            // still configured, is served again under the config it has now.
            name = next_retired(&mut retiring), if !retiring.is_empty() => {
                let next = retiring.remove(&name).and_then(|r| r.next);
                match next {
                    Some(site) => {
                        let h = worker::spawn(site, Arc::clone(&watcher), ready_tx.clone());
                        workers.insert(name, h);
                    }
                    // What it said while it finished is not the status of a served site.
                    None => forget_status(&name),
                }
            }
            // A site that cannot start (another service holds its lifetime lock) after
            // the service did: one whose root appeared only now, or one a reload added.
            // Its worker reports it and ends. Said here, or the site would be silently
            // unserved while `daemon.started` or `config.reloaded` lists it; other
            // failures after start are logged by their workers.
            msg = ready_rx.recv() => {
                if let Some((name, Err(e))) = msg {
                    // Only the worker that failed counts, not one a later reload started
                    // under the same name (that one keeps running).
                    let ended = match workers.get_mut(&name) {
                        Some(h) => h.exits_within(Duration::from_secs(1)).await,
                        None => false,
                    };
                    // A site of the service's own start is refused as it is when its root
                    // exists at start (exit 75): two services configured for one site is
                    // the operator's to fix, and a service quietly serving less than it
                    // was started with would hide it. A reload, meant to be safe, only
                    // drops the site it added.
                    if ended && from_start.contains(&name) {
                        tracing::error!(event = events::SITE_ERROR, site = %name, reason = %e,
                            "site refused; stopping the service");
                        workers.remove(&name);
                        shutdown(&mut workers, &mut retiring).await?;
                        return Err(e);
                    }
                    tracing::error!(event = events::SITE_ERROR, site = %name, reason = %e,
                        "site not served");
                    if ended {
                        workers.remove(&name);
                        forget_status(&name);
                    }
                }
            }
        }
    }
    shutdown(&mut workers, &mut retiring).await
}

/// A worker a reload stopped that is still finishing an activation (activations are
/// finished, never cut short), and what is to follow it.
struct Retiring {
    handle: worker::Handle,
    /// The site under its new config, served once this worker has exited: the worker
    /// holds the site's lifetime lock until then. `None` for a site no longer configured.
    next: Option<Site>,
}

/// The name of a retiring worker that has exited (pending while none has).
async fn next_retired(retiring: &mut BTreeMap<String, Retiring>) -> String {
    std::future::poll_fn(|cx| {
        for (name, r) in retiring.iter_mut() {
            if r.handle.poll_exited(cx).is_ready() {
                return std::task::Poll::Ready(name.clone());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Applies the config as it is now; returns the sites whose worker it stopped.
async fn reload(
    source: &Source,
    workers: &mut BTreeMap<String, worker::Handle>,
    retiring: &mut BTreeMap<String, Retiring>,
    watcher: &Arc<Watcher>,
    ready: &worker::Ready,
) -> Vec<String> {
    let new = match source.load() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = events::CONFIG_REJECTED, site = %site_names(workers),
                reason = %e, "new config rejected; keeping the running one");
            for h in workers.values() {
                h.heal();
            }
            return Vec::new();
        }
    };
    let stale: Vec<String> = workers
        .iter()
        .filter(|(n, h)| new.get(*n).is_none_or(|s| s.cfg != h.site.cfg))
        .map(|(n, _)| n.clone())
        .collect();
    let before = served(workers, retiring);
    // A changed or removed site stops at once, its work in progress undone (a claimed
    // upload is redone by the restarted site, under the new config): waiting for it could
    // hold the reload, READY=1 and SIGTERM for up to upload_timeout or a slow hook. An
    // activation under way is finished instead, as on SIGTERM, but not waited for here:
    // the other sites reload at once, and the changed one restarts once it is done
    // (`next_retired`), as the worker holds the site's lifetime lock until it exits.
    for name in &stale {
        if let Some(h) = workers.remove(name) {
            h.cancel();
            retiring.insert(
                name.clone(),
                Retiring {
                    handle: h,
                    next: None,
                },
            );
        }
        forget_status(name);
    }
    let added: Vec<String> = new
        .keys()
        .filter(|n| !before.contains(n))
        .cloned()
        .collect();
    let removed: Vec<String> = before
        .iter()
        .filter(|n| !new.contains_key(*n))
        .cloned()
        .collect();
    for r in retiring.values_mut() {
        r.next = None;
    }
    for (name, site) in new {
        if workers.contains_key(&name) {
            continue;
        }
        match retiring.get_mut(&name) {
            Some(r) => r.next = Some(site),
            None => {
                let h = worker::spawn(site, Arc::clone(watcher), ready.clone());
                workers.insert(name, h);
            }
        }
    }
    for h in workers.values() {
        h.heal();
    }
    // Under its own name too: a query for the removed site's events must find where they
    // stop, and why.
    for name in &removed {
        tracing::info!(event = events::CONFIG_RELOADED, site = %name, removed = true,
            "site no longer configured; not served any more");
    }
    let now = served(workers, retiring);
    tracing::info!(
        event = events::CONFIG_RELOADED,
        site = %now.join(","),
        sites = now.len(),
        added = %added.join(","),
        removed = %removed.join(","),
        "config reloaded"
    );
    warn_if_no_sites(source, now.len());
    stale
}

/// The sites configured now: those with a worker, and those whose worker is to start once
/// the one a reload stopped has finished.
fn served(
    workers: &BTreeMap<String, worker::Handle>,
    retiring: &BTreeMap<String, Retiring>,
) -> Vec<String> {
    let pending = retiring
        .iter()
        .filter(|(_, r)| r.next.is_some())
        .map(|(n, _)| n);
    workers
        .keys()
        .chain(pending)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A service with no sites runs (a site may come with the next reload) but does nothing:
/// say so, or an operator reading `daemon.started` would think deploys are watched.
fn warn_if_no_sites(source: &Source, sites: usize) {
    if let (0, Source::Config(path)) = (sites, source) {
        tracing::warn!(
            event = events::SITE_ERROR,
            site = "",
            reason = %format!(
                "no sites configured in {}: add [sites.NAME] there or a file in sites.d/, then reload",
                path.display()
            ),
            "no sites configured; nothing is watched"
        );
    }
}

/// Daemon-level events carry every site they concern, comma-separated, in `site`.
fn site_names(workers: &BTreeMap<String, worker::Handle>) -> String {
    workers.keys().cloned().collect::<Vec<_>>().join(",")
}

/// Undoes every site's work in progress and waits for every worker to exit. All flags
/// are set before the first wait, so the sites wind down together.
async fn stop_all(workers: &mut BTreeMap<String, worker::Handle>) {
    let handles = std::mem::take(workers);
    for h in handles.values() {
        h.cancel();
    }
    for (_, h) in handles {
        h.exited().await;
    }
}

/// How long a start may take before systemd is asked for more time.
const SLOW_START: Duration = Duration::from_secs(1);

/// What a stop may still have to do once a site's activation is over: its verdict in the
/// journal, pruning, and undoing the rest (an interrupted build is removed).
const STOP_MARGIN: Duration = Duration::from_secs(30);

async fn shutdown(
    workers: &mut BTreeMap<String, worker::Handle>,
    retiring: &mut BTreeMap<String, Retiring>,
) -> Result<()> {
    // A worker a reload stopped may still be finishing an activation: waited for too.
    let handles: Vec<worker::Handle> = std::mem::take(workers)
        .into_values()
        .chain(std::mem::take(retiring).into_values().map(|r| r.handle))
        .collect();
    let names = handles
        .iter()
        .map(|h| h.site.name().to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(
        event = events::DAEMON_STOPPING,
        site = %names,
        "stopping: finishing or undoing in-flight work"
    );
    systemd::stopping();
    for h in &handles {
        h.cancel();
    }
    // A stop finishes an activation it finds running (hooks, health check, rollback)
    // rather than leave the site undecided; that can outlast the unit's TimeoutStopSec,
    // after which systemd would SIGKILL it halfway. The sites still at work are asked
    // now, after the cancel: the others start nothing more.
    let longest = handles
        .iter()
        .filter(|h| h.busy())
        .map(|h| crate::activate::longest(&h.site.cfg))
        .max();
    let exited = async {
        for h in handles {
            h.exited().await;
        }
    };
    match longest {
        Some(work) => {
            let until = worker::after(work.saturating_add(STOP_MARGIN));
            tracing::debug!(site = %names, extend_ms = (until - Instant::now()).as_millis() as u64,
                "waiting for work in progress; asking systemd for the time it may take");
            extend_stop_until(exited, until).await;
        }
        None => exited.await,
    }
    Ok::<(), Error>(())
}

/// Waits for `done` while telling systemd the stop may last until `until`
/// (`EXTEND_TIMEOUT_USEC=`), renewed only when one message cannot cover the whole wait.
/// Past `until` nothing more is asked: systemd's own timeout applies again.
async fn extend_stop_until(done: impl std::future::Future<Output = ()>, until: Instant) {
    tokio::pin!(done);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let covered = systemd::extend_timeout(left);
        if covered >= left {
            break;
        }
        tokio::select! {
            _ = &mut done => return,
            _ = tokio::time::sleep(covered / 2) => {}
        }
    }
    done.await;
}
