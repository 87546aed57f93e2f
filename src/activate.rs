//! Switching `current`: `before_activate`, the atomic swap, `after_activate`, the health
//! check, and the automatic rollback when the new release is unhealthy.
//!
//! The journal brackets every switch: a `trial` record before the swap and an
//! `activated`/`failed`/`rolled_back` verdict after it. A crash in between leaves an open
//! trial, which the next start resolves (see `resume_trial`): the trial is resumed, i.e.
//! the health check runs again against the release `current` points at, and the verdict
//! is recorded as usual (rolling back if it fails). Never left undecided.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::SiteConfig;
use crate::error::{Error, Result};
use crate::events;
use crate::fsops;
use crate::hooks::{self, HookEnv, HookFailure};
use crate::release::store::{Journal, Op, OpenTrial, State};
use crate::site::Site;

/// Options of an activation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Allow activating a release that failed before, or whose last verify found drift.
    pub force: bool,
    /// The release was just built and verified from its upload: its tree is not walked
    /// again before the switch.
    pub just_built: bool,
}

/// The longest an activation for a site configured by `cfg` can take once it has started,
/// by the bounds its config sets: `before_activate`, `after_activate`, every health check
/// attempt and the intervals between them, and `after_activate` again for the release an
/// automatic rollback restores (each hook bounded by `hook_timeout` and the grace after
/// SIGTERM, `hooks::bound`). A stop waits for an
/// activation rather than leave it undecided: this is what it may have to wait.
pub fn longest(cfg: &SiteConfig) -> Duration {
    // A run at its timeout gets SIGTERM, then a grace before SIGKILL.
    let one = crate::hooks::bound(cfg.hook_timeout);
    let hook = |argv: &Option<Vec<String>>| {
        if argv.is_some() {
            one
        } else {
            Duration::ZERO
        }
    };
    let attempts = cfg.health_retries.max(1);
    let health = if cfg.health_check.is_some() {
        one.saturating_mul(attempts)
            .saturating_add(cfg.health_interval.saturating_mul(attempts - 1))
    } else {
        Duration::ZERO
    };
    let restore = if cfg.auto_rollback {
        hook(&cfg.after_activate)
    } else {
        Duration::ZERO
    };
    hook(&cfg.before_activate)
        .saturating_add(hook(&cfg.after_activate))
        .saturating_add(health)
        .saturating_add(restore)
}

fn hook_env(site: &Site, id: &str, previous: Option<&str>) -> HookEnv {
    HookEnv {
        release_id: id.to_string(),
        release_path: hooks::absolute(&site.release(id)),
        previous: previous.map(str::to_string),
        site_name: site.name().to_string(),
        site_root: hooks::absolute(site.root()),
        user: site.cfg.hook_user.clone(),
        record: Some(site.hook_record()),
    }
}

fn log_hook_failure(site: &Site, id: &str, f: &HookFailure) {
    tracing::warn!(
        event = events::HOOK_FAILED,
        site = site.name(),
        release = id,
        hook = %f.hook,
        status = %f.status,
        stderr = non_empty(f.stderr_tail.trim_end()),
        reason = %f,
        "hook failed"
    );
}

/// `s`, or nothing when it is empty: a program that printed nothing gets no `stderr`
/// field, rather than one a monitor would show as a blank error.
fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Points `current` at release `id` atomically and makes sure the configured links exist.
pub fn swap_current(site: &Site, id: &str) -> Result<()> {
    fsops::swap_symlink(&site.current(), &Site::current_target_for(id))?;
    ensure_links(site);
    warn_dangling_links(site);
    Ok(())
}

/// Says which configured links lead nowhere now that `current` is in place: made anyway
/// (what they point at may come later), but a nested link written as if from the root
/// (`"web/htdocs" = "current/public"`) is a common slip. Once per activation.
fn warn_dangling_links(site: &Site) {
    for (link, target) in &site.cfg.links {
        let path = site.root().join(link);
        if std::fs::metadata(&path).is_ok() {
            continue;
        }
        let resolved = path.parent().unwrap_or(site.root()).join(target);
        tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(),
            link = %link.display(), target = %target.display(),
            reason = %format!(
                "link {} -> {} points at {}, which does not exist; a link's target is relative to the link's own directory",
                link.display(), target.display(), resolved.display()),
            "dangling link");
    }
}

/// Creates or corrects each configured link (`ROOT/<link>` -> target). Returns what it
/// changed. A link it cannot make (a real file or directory in the way) is left alone and
/// logged: by then `current` has switched, and a link must not turn that switch into an
/// error that skips the release's hooks and health check and leaves its trial open.
pub fn ensure_links(site: &Site) -> Vec<String> {
    let mut changed = Vec::new();
    for (link, target) in &site.cfg.links {
        match ensure_link(site, link, target) {
            Ok(true) => changed.push(format!("{} -> {}", link.display(), target.display())),
            Ok(false) => {}
            Err(e) => tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(),
                link = %link.display(), target = %target.display(), reason = %e,
                "configured link not made"),
        }
    }
    changed
}

/// Makes the one configured link `link` (relative to the root) point at `target`; true
/// when it had to be made or corrected. One at a time, so healing can say which links it
/// made: making them all at the first missing one would hide the others from its report.
pub fn ensure_link(site: &Site, link: &Path, target: &Path) -> Result<bool> {
    let path = site.root().join(link);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(&path).ok().as_deref() == Some(target) {
                return Ok(false);
            }
        }
        Ok(_) => {
            return Err(Error::Failed(format!(
                "{} exists and is not a symlink; not replacing it with a link to {}",
                path.display(),
                target.display()
            )))
        }
        Err(_) => {
            if let Some(parent) = path.parent() {
                fsops::ensure_dir(parent, 0o755)?;
            }
        }
    }
    fsops::swap_symlink(&path, target)?;
    Ok(true)
}

/// Activates release `id`: hooks, swap, health check, rollback on failure. Returns once
/// `current` has its final value: `false` when `id` was already the settled current
/// release and nothing ran. The drift shown for a release no longer live is then cleared
/// (`verify::recheck_after_switch`), whatever the outcome.
pub fn activate(site: &Site, journal: &mut Journal, id: &str, opts: Options) -> Result<bool> {
    let result = activate_once(site, journal, id, opts);
    crate::verify::recheck_after_switch(site);
    result
}

fn activate_once(site: &Site, journal: &mut Journal, id: &str, opts: Options) -> Result<bool> {
    let state = journal.state();
    let info = state.get(id).ok_or_else(|| site.no_release(id))?;
    if !site.release_exists(id) {
        return Err(Error::Failed(format!(
            "release {id} is missing from {}",
            site.releases().display()
        )));
    }
    if let Some((reason, _)) = &info.failed {
        if !opts.force {
            return Err(Error::Failed(format!(
                "release {id} failed before ({reason}); use --force to activate it anyway"
            )));
        }
    }
    let Switch::From(previous) = switch_to(site, state, site.current_id(), id) else {
        return Ok(false);
    };
    refuse_drifted(site, id, opts.force, !opts.just_built)?;
    current_replaceable(site)?;
    let started = Instant::now();
    let env = hook_env(site, id, previous.as_deref());
    if let Some(argv) = &site.cfg.before_activate {
        if let Err(f) = hooks::run("before_activate", argv, &env, site.cfg.hook_timeout) {
            log_hook_failure(site, id, &f);
            journal.append(Op::Failed {
                release: id.to_string(),
                reason: f.to_string(),
            })?;
            return Err(Error::Failed(format!("release {id} not activated: {f}")));
        }
    }
    journal.append(Op::Trial {
        release: id.to_string(),
        previous: previous.clone(),
        rollback: false,
    })?;
    if let Err(e) = swap_current(site, id) {
        // Nothing switched: close the trial now, or the next healing pass would take it
        // for a crash in the middle of an activation.
        journal.append(Op::RolledBack {
            release: id.to_string(),
            to: previous.clone().unwrap_or_default(),
            reason: format!("the switch of current failed: {e}"),
        })?;
        return Err(e);
    }
    trial(site, journal, id, previous.as_deref(), started).map(|()| true)
}

/// Where a switch of `current` to `id` starts.
enum Switch {
    /// `id` is current by the keeper's own last switch: nothing to do.
    AlreadyCurrent,
    /// The release being left, if any.
    From(Option<String>),
}

/// Where switching `current` (now naming `link`) to `id` starts, for `activate` and
/// `rollback`. `AlreadyCurrent` (logged, links made sure of) only when the keeper's own
/// last switch put `id` there. When `current` was pointed at `id` by hand (a staged
/// release made live with `ln -sfn`), the switch still runs its hooks and checks and is
/// recorded, leaving the release the keeper last made current; only the swap is a no-op.
fn switch_to(site: &Site, state: &State, link: Option<String>, id: &str) -> Switch {
    let exists = |r: &str| site.release_exists(r);
    let Some(link) = link else {
        // `current` deleted or dangling names no release: the one being left is where
        // healing would have put it, which an automatic rollback also goes back to. The
        // hooks get it as PREVIOUS_RELEASE_ID (not an empty value, as for a first
        // release), and the journal and the events name it.
        return Switch::From(state.left_when_current_lost(id, exists));
    };
    if link != id {
        return Switch::From(Some(link));
    }
    if state.is_settled_current(id) {
        ensure_links(site);
        tracing::info!(
            event = crate::events::RELEASE_ALREADY_CURRENT,
            site = site.name(),
            release = id,
            "release is already current"
        );
        return Switch::AlreadyCurrent;
    }
    Switch::From(state.switched_from(id, exists))
}

/// Refuses a switch to release `id` while its last verify found drift, or a check of its
/// tree now finds some (a walk, re-hashing only files whose metadata moved), unless `force`:
/// drift detection exists so that a release no longer matching what was uploaded (a hand
/// edit, an added file) does not go live unnoticed, and a switch is the moment it would.
/// Checked before any hook runs; only the last check of `id` itself counts, so a clean
/// `verify SITE ID` lifts the refusal.
fn refuse_drifted(site: &Site, id: &str, force: bool, walk: bool) -> Result<()> {
    let report = match crate::verify::drifted(site, id) {
        Some(report) => report,
        None if !walk => return Ok(()),
        None => {
            // No check on record found drift, but the release may have been edited since
            // (a file added by hand to an old release, then `rollback`): its tree is
            // walked, and a file whose metadata moved is re-hashed, before it goes live.
            match crate::verify::verify_release_at(site, id, crate::verify::Depth::Changed) {
                Ok(r) if r.drift.is_empty() => return Ok(()),
                Ok(r) => {
                    crate::verify::record_release(site, &r)?;
                    r
                }
                // Not checkable (no stored manifest): the switch goes on as before.
                Err(e) => {
                    tracing::warn!(event = events::SITE_ERROR, site = site.name(), release = id,
                        reason = %e, "cannot check the release before switching to it");
                    return Ok(());
                }
            }
        }
    };
    if !force {
        return Err(crate::verify::refusal(site, &report));
    }
    tracing::warn!(
        event = events::DRIFT_OVERRIDDEN,
        site = site.name(),
        release = id,
        checked = %report.checked,
        count = report.drift.len(),
        paths = %report.drift.join("; "),
        "switching to a release whose last verify found drift (--force)"
    );
    Ok(())
}

/// Refuses a switch while `current` is a real file or directory rather than a symlink:
/// `rename(2)` cannot put a link over it, and what it holds may be an operator's, so only
/// healing moves it aside. Checked before any hook runs (a migration must not run for a
/// switch that cannot happen).
fn current_replaceable(site: &Site) -> Result<()> {
    let path = site.current();
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.file_type().is_symlink() => Err(Error::Failed(format!(
            "site {}: {} is a real {}, not a symlink; nothing was switched. \
             `release-keeper heal {}` moves it aside (into {}/), then retry",
            site.name(),
            path.display(),
            if m.is_dir() { "directory" } else { "file" },
            site.name(),
            site.displaced().display()
        ))),
        _ => Ok(()),
    }
}

/// Runs `after_activate` and the health check for the release `current` now points at,
/// and records the verdict (rolling back when configured, with `after_activate` run again
/// for the restored release).
fn trial(
    site: &Site,
    journal: &mut Journal,
    id: &str,
    previous: Option<&str>,
    started: Instant,
) -> Result<()> {
    let env = hook_env(site, id, previous);
    let failure = check(site, &env);
    let Some(f) = failure else {
        journal.append(Op::Activated {
            release: id.to_string(),
            previous: previous.map(str::to_string),
        })?;
        tracing::info!(
            event = events::RELEASE_ACTIVATED,
            site = site.name(),
            release = id,
            previous,
            duration_ms = started.elapsed().as_millis() as u64,
            "release activated"
        );
        return Ok(());
    };
    let back_to = rollback_target(site, journal, id, previous);
    Err(fail_and_restore(
        site, journal, id, previous, back_to, &f, started,
    )?)
}

/// The verdict on a release that failed `after_activate` or its health check after
/// `current` was switched to it: it is marked failed and, when `back_to` names a release
/// (see [`rollback_target`]), `current` goes back there (and `after_activate` runs for
/// it). Returns the error the command reports.
fn fail_and_restore(
    site: &Site,
    journal: &mut Journal,
    id: &str,
    previous: Option<&str>,
    back_to: Option<String>,
    f: &HookFailure,
    started: Instant,
) -> Result<Error> {
    let reason = f.to_string();
    journal.append(Op::Failed {
        release: id.to_string(),
        reason: reason.clone(),
    })?;
    match back_to {
        Some(to) => {
            roll_back_failed(site, journal, id, &to, &reason, started)?;
            Ok(Error::Failed(format!(
                "release {id} failed its checks ({reason}); rolled back to {to}"
            )))
        }
        None => {
            // The failure was logged once where it happened (`health.failed` or
            // `hook.failed`); a second `health.failed` would count as another failure.
            tracing::warn!(
                event = events::RELEASE_STAYS_CURRENT,
                site = site.name(),
                release = id,
                previous,
                reason = %reason,
                auto_rollback = site.cfg.auto_rollback,
                "release failed its checks and stays current"
            );
            Ok(Error::Failed(format!(
                "release {id} failed its checks ({reason}) and stays current (no rollback)"
            )))
        }
    }
}

/// Where an automatic rollback from the failed release `id` goes: the release current
/// before it when still good and on disk, else the previous good one. None when
/// `auto_rollback` is off or there is nowhere to go.
fn rollback_target(
    site: &Site,
    journal: &Journal,
    id: &str,
    previous: Option<&str>,
) -> Option<String> {
    if !site.cfg.auto_rollback {
        return None;
    }
    let state = journal.state();
    previous
        .filter(|p| state.is_good(p) && site.release_exists(p))
        .map(str::to_string)
        .or_else(|| state.previous_good(Some(id), |r| site.release_exists(r)))
}

/// Switches `current` from the failed release `id` back to `to` and records it.
fn roll_back_failed(
    site: &Site,
    journal: &mut Journal,
    id: &str,
    to: &str,
    reason: &str,
    started: Instant,
) -> Result<()> {
    swap_current(site, to)?;
    journal.append(Op::RolledBack {
        release: id.to_string(),
        to: to.to_string(),
        reason: reason.to_string(),
    })?;
    // The server was told about the failed release (its after_activate ran, e.g.
    // a php-fpm reload); it must be told about the restored one too, or it keeps
    // serving what was rolled back. No health check: the release was good before,
    // and a second failure must not start rolling around.
    // Its failure is logged (`hook.failed`) and changes nothing more.
    let _ = after_activate(site, &hook_env(site, to, Some(id)));
    tracing::warn!(
        event = events::RELEASE_ROLLED_BACK,
        site = site.name(),
        release = id,
        previous = %to,
        reason = %reason,
        duration_ms = started.elapsed().as_millis() as u64,
        "release failed its checks; rolled back"
    );
    Ok(())
}

/// Finishes an automatic rollback a crash cut short between the `failed` record and the
/// switch back, which left `current` on the failed release. Returns the failed release
/// when it did something.
pub fn finish_rollback(site: &Site, journal: &mut Journal) -> Result<Option<String>> {
    let Some((id, previous)) = journal.state().unfinished_rollback.clone() else {
        return Ok(None);
    };
    if site.current_id().as_deref() != Some(id.as_str()) {
        // Switched back already (only the record is missing), or by hand since.
        return Ok(None);
    }
    let Some(to) = rollback_target(site, journal, &id, previous.as_deref()) else {
        return Ok(None);
    };
    let reason = journal
        .state()
        .get(&id)
        .and_then(|r| r.failed.as_ref())
        .map_or_else(|| "failed its checks".to_string(), |(r, _)| r.clone());
    roll_back_failed(site, journal, &id, &to, &reason, Instant::now())?;
    Ok(Some(id))
}

/// Tells the server about a switch healing made from release `from` to `to` (the live
/// release was deleted, or `current` was lost): `after_activate` runs for `to`, as after
/// an automatic rollback, since a server caching resolved paths (php-fpm's realpath
/// cache, opcache) otherwise keeps serving the release that was left. No health check
/// and no verdict: `to` was activated and good before, and a failure here is only logged
/// (`hook.failed`), so healing never loops on it.
pub fn after_heal_switch(site: &Site, to: &str, from: &str) {
    let _ = after_activate(site, &hook_env(site, to, Some(from)));
}

/// Runs the site's `after_activate` hook, if any, for the release in `env`; a failure is
/// logged as `hook.failed`.
fn after_activate(site: &Site, env: &HookEnv) -> std::result::Result<(), HookFailure> {
    let Some(argv) = &site.cfg.after_activate else {
        return Ok(());
    };
    hooks::run("after_activate", argv, env, site.cfg.hook_timeout)
        .inspect_err(|f| log_hook_failure(site, &env.release_id, f))
}

/// `after_activate`, then the health check with retries. `None` when all passed.
fn check(site: &Site, env: &HookEnv) -> Option<HookFailure> {
    let cfg = &site.cfg;
    if let Err(f) = after_activate(site, env) {
        return Some(f);
    }
    let argv = cfg.health_check.as_ref()?;
    let attempts = cfg.health_retries.max(1);
    let mut last = None;
    for attempt in 1..=attempts {
        match hooks::run("health_check", argv, env, cfg.hook_timeout) {
            Ok(()) => return None,
            Err(f) => {
                tracing::info!(event = crate::events::HEALTH_ATTEMPT_FAILED, site = site.name(), release = %env.release_id, attempt,
                    attempts, status = %f.status, "health check attempt failed");
                last = Some(f);
            }
        }
        if attempt < attempts {
            std::thread::sleep(cfg.health_interval);
        }
    }
    if let Some(f) = &last {
        tracing::warn!(
            event = events::HEALTH_FAILED,
            site = site.name(),
            release = %env.release_id,
            status = %f.status,
            stderr = non_empty(f.stderr_tail.trim_end()),
            attempts,
            reason = %f,
            "health check failed"
        );
    }
    last
}

/// Where a rollback left `current`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The release `current` points at.
    pub to: String,
    /// False when `to` was current already as the keeper's last switch left it (nothing
    /// was switched, no hook ran). True, with hooks and checks run, when `current` had been
    /// pointed at `to` by hand.
    pub switched: bool,
    /// The previous good release a plain rollback passed over because its last verify
    /// found drift.
    pub skipped: Option<String>,
}

/// Rolls `current` back to the previous good release (or `to`). A release whose last
/// verify found drift is refused as a target unless `force`; without `to`, the previous
/// good release that has not drifted is chosen. Runs `after_activate` and the health check
/// on the target; a target that fails them is marked failed and, with `auto_rollback`,
/// `current` returns to the release it was rolled back from. Drift is then seen to as
/// after [`activate`].
pub fn rollback(
    site: &Site,
    journal: &mut Journal,
    to: Option<&str>,
    force: bool,
) -> Result<Rollback> {
    let result = rollback_once(site, journal, to, force);
    crate::verify::recheck_after_switch(site);
    result
}

fn rollback_once(
    site: &Site,
    journal: &mut Journal,
    to: Option<&str>,
    force: bool,
) -> Result<Rollback> {
    let state = journal.state();
    let link = site.current_id();
    let exists = |r: &str| site.release_exists(r);
    let (current, previous) = state.current_and_previous(link.clone(), exists);
    let mut skipped = None;
    let target = match to {
        Some(t) => t.to_string(),
        None => {
            let previous = previous.ok_or_else(|| {
                Error::Failed(format!(
                    "site {}: no previous good release to roll back to",
                    site.name()
                ))
            })?;
            // A plain rollback means "back to the last good state": a release known to
            // have drifted is not that, so an older clean one is chosen by the same rules.
            // When every candidate has drifted, `previous` is kept and refused below.
            let clean = |r: &str| exists(r) && crate::verify::drifted(site, r).is_none();
            match state.previous_good(current.as_deref(), clean) {
                Some(c) if !force && c != previous => {
                    tracing::warn!(event = events::DRIFT_SKIPPED, site = site.name(),
                        release = %previous, to = %c,
                        reason = "its last verify found drift",
                        "rollback passes over a drifted release");
                    skipped = Some(previous);
                    c
                }
                _ => previous,
            }
        }
    };
    let info = state.get(&target).ok_or_else(|| site.no_release(&target))?;
    if let Some((reason, _)) = &info.failed {
        return Err(Error::Failed(format!(
            "release {target} failed ({reason}); it is not a rollback target"
        )));
    }
    // A rollback goes back to a release that was live: one the keeper never switched to
    // (staged, or interrupted before its `before_activate` finished) has not had its
    // `before_activate` (migrations), which a rollback does not run. `activate` does.
    if !state.was_current(&target) {
        return Err(Error::Failed(format!(
            "release {target} was never activated (staged, or its activation was \
             interrupted); it is not a rollback target: `release-keeper activate {} {target}` \
             runs its before_activate, then the switch and the checks",
            site.name()
        )));
    }
    if !site.release_exists(&target) {
        return Err(Error::Failed(format!(
            "release {target} is missing on disk"
        )));
    }
    // Only `--to` can name current. Like `activate` of the current release, the wanted
    // state holds already: a script making sure a release is live must not see a failure
    // for it.
    let Switch::From(current) = switch_to(site, state, link, &target) else {
        return Ok(Rollback {
            to: target,
            switched: false,
            skipped,
        });
    };
    refuse_drifted(site, &target, force, true)?;
    current_replaceable(site)?;
    let started = Instant::now();
    // Recorded as an open trial before the switch, and as a rollback only after the
    // verdict: a crash at any point after the switch must have the target's checks run
    // again at the next start (as for an activation), not leave a target that may fail
    // them current with its switch taken for settled. A crash before the switch closes
    // the trial with nothing changed.
    journal.append(Op::Trial {
        release: target.clone(),
        previous: current.clone(),
        rollback: true,
    })?;
    if let Err(e) = swap_current(site, &target) {
        journal.append(Op::TrialClosed {
            release: target.clone(),
            reason: format!("the switch of current failed: {e}"),
        })?;
        return Err(e);
    }
    if let Some(e) = rollback_verdict(site, journal, current.as_deref(), &target, started)? {
        return Err(e);
    }
    Ok(Rollback {
        to: target,
        switched: true,
        skipped,
    })
}

/// The verdict on a rollback from `from` to `target` once `current` names `target` (the
/// rollback's trial is open): its checks run; passing, the rollback is recorded. Failing,
/// the same verdict as an activation's: `target` is marked failed (so no later rollback
/// picks it again) and `current` goes back to `from`, never further: the command either
/// switched to a healthy release or changed nothing but that mark. Returns the error the
/// command reports.
fn rollback_verdict(
    site: &Site,
    journal: &mut Journal,
    from: Option<&str>,
    target: &str,
    started: Instant,
) -> Result<Option<Error>> {
    let env = hook_env(site, target, from);
    let Some(f) = check(site, &env) else {
        record_rollback(site, journal, from, target, started)?;
        return Ok(None);
    };
    let state = journal.state();
    let back_to = from
        .filter(|c| site.cfg.auto_rollback && state.is_good(c) && site.release_exists(c))
        .map(str::to_string);
    if back_to.is_none() {
        // `current` stays on the target: its switch is recorded as done, so that the
        // failure leaves no unfinished rollback that healing would take further back.
        journal_rollback(journal, from, target)?;
    }
    let e = fail_and_restore(site, journal, target, from, back_to, &f, started)?;
    Ok(Some(Error::Failed(format!(
        "rollback to {target} failed: {e}"
    ))))
}

/// Journals the switch of a requested rollback from `from` to `to` (closing its trial).
fn journal_rollback(journal: &mut Journal, from: Option<&str>, to: &str) -> Result<()> {
    journal.append(Op::RolledBack {
        release: from.unwrap_or_default().to_string(),
        to: to.to_string(),
        reason: "rollback requested".into(),
    })
}

/// Records a rollback from `from` to `to` whose target passed its checks (closing its
/// trial) and logs it.
fn record_rollback(
    site: &Site,
    journal: &mut Journal,
    from: Option<&str>,
    to: &str,
    started: Instant,
) -> Result<()> {
    journal_rollback(journal, from, to)?;
    // Logged once the target passed its checks, as `release.activated` is: a rollback
    // whose target fails them is not one a monitor should count (`health.failed` or
    // `hook.failed` and the return to `current`'s release are logged instead), and
    // `duration_ms` covers the checks.
    tracing::info!(
        event = events::RELEASE_ROLLED_BACK,
        site = site.name(),
        // Absent when `current` was missing and healing had no release to restore.
        release = from,
        previous = %to,
        reason = "rollback requested",
        duration_ms = started.elapsed().as_millis() as u64,
        "rolled back"
    );
    Ok(())
}

/// Resolves a trial interrupted by a crash: resumed (checks re-run) when `current` points
/// at the release under trial; closed as not activated when the swap never happened.
/// Returns the trial it resolved.
pub fn resume_trial(site: &Site, journal: &mut Journal) -> Result<Option<OpenTrial>> {
    let Some(open) = journal.state().open_trial.clone() else {
        return Ok(None);
    };
    let (id, previous) = (open.release.as_str(), open.previous.as_deref());
    let what = open.what();
    if site.current_id().as_deref() == Some(id) {
        tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), release = %id,
            what = %format!("resumed the {what}"),
            reason = "interrupted trial: checks re-run", "resuming trial");
        if open.rollback {
            let _ = rollback_verdict(site, journal, previous, id, Instant::now())?;
        } else {
            let _ = trial(site, journal, id, previous, Instant::now());
        }
    } else if open.rollback {
        // The release rolled back to stays what it was: good, a rollback target.
        journal.append(Op::TrialClosed {
            release: id.to_string(),
            reason: "interrupted before the switch".into(),
        })?;
        tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), release = %id,
            what = %format!("closed the {what}"),
            reason = "interrupted before the switch; current not switched", "trial closed");
    } else {
        journal.append(Op::RolledBack {
            release: id.to_string(),
            to: site.current_id().unwrap_or_default(),
            reason: "interrupted before the switch".into(),
        })?;
        tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), release = %id,
            what = %format!("closed the {what}"),
            reason = "interrupted before the switch; not activated", "trial closed");
    }
    Ok(Some(open))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv() -> Option<Vec<String>> {
        Some(vec!["/bin/true".to_string()])
    }

    #[test]
    fn longest_activation_adds_every_bounded_step() {
        let mut cfg = SiteConfig::with_defaults("shop", "/srv/shop".into());
        cfg.hook_timeout = Duration::from_secs(60);
        cfg.health_retries = 3;
        cfg.health_interval = Duration::from_secs(2);
        cfg.auto_rollback = true;
        assert_eq!(longest(&cfg), Duration::ZERO, "no hooks, no health check");
        cfg.before_activate = argv();
        cfg.after_activate = argv();
        cfg.health_check = argv();
        // before + after + 3 attempts 2 s apart + after again for the restored release,
        // each run 60 s and the 5 s after SIGTERM.
        let run = 65;
        assert_eq!(
            longest(&cfg),
            Duration::from_secs(run + run + 3 * run + 2 * 2 + run)
        );
        cfg.auto_rollback = false;
        assert_eq!(
            longest(&cfg),
            Duration::from_secs(run + run + 3 * run + 2 * 2)
        );
        cfg.health_retries = 0;
        assert_eq!(
            longest(&cfg),
            Duration::from_secs(run + run + run),
            "zero retries still makes one attempt"
        );
    }

    #[test]
    fn longest_activation_saturates_instead_of_overflowing() {
        let mut cfg = SiteConfig::with_defaults("shop", "/srv/shop".into());
        cfg.hook_timeout = Duration::from_millis(u64::MAX);
        cfg.health_interval = Duration::from_millis(u64::MAX);
        cfg.health_retries = u32::MAX;
        cfg.before_activate = argv();
        cfg.after_activate = argv();
        cfg.health_check = argv();
        assert_eq!(longest(&cfg), Duration::MAX);
    }
}
