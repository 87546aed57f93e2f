//! The commands other than `run`: each loads what it needs, takes the site's operation
//! lock when it changes anything, and prints human output (or one JSON document) on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde_json::{json, Value};

use crate::activate;
use crate::config::{self, Config, SiteConfig};
use crate::error::{Error, IoContext, Result};
use crate::fsops::{self, Lock};
use crate::heal;
use crate::pipeline::{self, Outcome};
use crate::release::retention;
use crate::release::store::{Journal, Op, State};
use crate::site::Site;
use crate::upload::manifest;
use crate::upload::marker::{self, MarkerSpec};
use crate::verify;

/// Loads the config named by `--config`, the environment or the default path; with
/// `--root DIR` (`root`), the one site it stands for.
pub fn load_config(flag: Option<&Path>, root: Option<&Path>) -> Result<Config> {
    match root {
        Some(root) => crate::service::root_config(root, flag),
        None => Ok(config::load(&config::resolve_path(flag))?),
    }
}

/// The configured site `name`.
pub fn site(cfg: &Config, name: &str) -> Result<Site> {
    cfg.sites.get(name).cloned().map(Site::new).ok_or_else(|| {
        let known: Vec<&str> = cfg.sites.keys().map(String::as_str).collect();
        Error::Usage(format!(
            "unknown site {name:?} in {} (configured: {})",
            cfg.path.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// Parses `--wait [DURATION]`: absent = do not wait, "forever" = no limit.
pub fn wait_limit(wait: &Option<String>) -> Result<Option<Duration>> {
    match wait.as_deref() {
        None => Ok(Some(Duration::ZERO)),
        Some("forever") => Ok(None),
        Some(s) => config::parse_duration(s)
            .map(Some)
            .map_err(|e| Error::Usage(format!("--wait {s:?}: {e}"))),
    }
}

/// A release id given on the command line that cannot be an id at all (`../x`, `-`) is a
/// usage error (exit 2), not a missing release (exit 1).
fn usage_id(id: &str) -> Result<()> {
    marker::check_id(id).map_err(Error::Usage)
}

fn require_root(site: &Site) -> Result<()> {
    if site.root_exists() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "site {}: root {} does not exist (run `release-keeper init {}`)",
            site.name(),
            site.root().display(),
            site.name()
        )))
    }
}

/// Takes the site's operation lock, waiting as `--wait` says; busy is exit 75.
pub fn op_lock(site: &Site, wait: &Option<String>) -> Result<Lock> {
    require_root(site)?;
    act_as_site_owner(site)?;
    site.ensure_layout()?;
    heal::repair_locks(site, false)?;
    take_op_lock(site, wait)
}

/// The operation lock on a layout that has it, within `--wait`; `Error::Busy` (exit 75)
/// when it stays taken.
fn take_op_lock(site: &Site, wait: &Option<String>) -> Result<Lock> {
    let limit = wait_limit(wait)?;
    fsops::op_lock(&site.op_lock(), limit)?.ok_or_else(|| Error::Busy {
        site: site.name().to_string(),
        lock: site.op_lock(),
        waited: wait.clone(),
    })
}

/// The lock of a `--dry-run`, which must change nothing: no missing directory of the
/// layout is made (run as root, a dry run left a root-owned `.release-keeper/` the
/// service could not work in). Without a state directory there is no lock to take, and
/// nothing the keeper made to look at.
fn dry_run_lock(site: &Site, wait: &Option<String>) -> Result<Option<Lock>> {
    require_root(site)?;
    act_as_site_owner(site)?;
    if !site.state().is_dir() {
        return Ok(None);
    }
    // A lock path that is not a file cannot be locked until healing moves it aside,
    // which `heal --dry-run` reports instead of doing.
    let foreign = std::fs::symlink_metadata(site.op_lock()).is_ok_and(|m| !m.is_file());
    if foreign {
        return Ok(None);
    }
    take_op_lock(site, wait).map(Some)
}

/// The operation lock, or for a dry run the lock of `dry_run_lock`.
fn lock_for(site: &Site, dry_run: bool, wait: &Option<String>) -> Result<Option<Lock>> {
    if dry_run {
        dry_run_lock(site, wait)
    } else {
        op_lock(site, wait).map(Some)
    }
}

/// Run as root (`sudo release-keeper rollback shop`) on a site whose state belongs to
/// another user (the service's `User=`), a command becomes that user for good, groups
/// included, as the service is: what it makes stays the service's (it could never prune
/// a root-owned release nor take a root-owned lock), and hooks run as under the service.
/// Nothing changes when the state is root's (a service run as root) or not made yet.
fn act_as_site_owner(site: &Site) -> Result<()> {
    use nix::unistd::{Gid, Uid, User};
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(site.state()) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let uid = Uid::from_raw(meta.uid());
    let failed = |what: &str, e: nix::Error| {
        Error::Failed(format!(
            "site {}: cannot act as uid {uid}, the owner of {}: {what}: {e}",
            site.name(),
            site.state().display()
        ))
    };
    let user = User::from_uid(uid).map_err(|e| failed("looking it up", e))?;
    let gid = user.as_ref().map_or(Gid::from_raw(meta.gid()), |u| u.gid);
    match user
        .as_ref()
        .and_then(|u| std::ffi::CString::new(u.name.as_bytes()).ok())
    {
        Some(name) => nix::unistd::initgroups(&name, gid),
        None => nix::unistd::setgroups(&[gid]),
    }
    .map_err(|e| failed("setting its groups", e))?;
    nix::unistd::setgid(gid).map_err(|e| failed("setgid", e))?;
    nix::unistd::setuid(uid).map_err(|e| failed("setuid", e))?;
    Ok(())
}

/// Prints a line of human or JSON output. A reader that closed the pipe early
/// (`status | head -1`, `list SITE | grep -q v2`) is not a failure of the command: the
/// operation is done (an `activate` has switched `current`), so it must not exit 1 with
/// "Broken pipe" and make a `pipefail` script believe it failed.
fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.at(Path::new("<stdout>")),
    }
}

fn print_json(v: &Value) -> Result<()> {
    out(&serde_json::to_string_pretty(v).unwrap_or_default())
}

/// The state word of SPEC.md for release `id`.
fn state_word(
    state: &State,
    id: &str,
    current: Option<&str>,
    previous: Option<&str>,
) -> &'static str {
    let Some(r) = state.get(id) else {
        return "good";
    };
    if Some(id) == current {
        "current"
    } else if r.failed.is_some() {
        "failed"
    } else if Some(id) == previous {
        "previous"
    } else if !r.activated {
        "staged"
    } else {
        "good"
    }
}

/// The `list --json` document of a site.
pub fn list_doc(site: &Site, journal: &Journal) -> Value {
    let state = journal.state();
    let current = site.current_id();
    let (_, previous) = state.current_and_previous(current.clone(), |r| site.release_exists(r));
    let releases: Vec<Value> = state
        .live_newest_first()
        .filter(|r| site.release_exists(&r.id))
        .map(|r| {
            let mut v = json!({
                "id": r.id,
                "state": state_word(state, &r.id, current.as_deref(), previous.as_deref()),
                "pinned": r.pinned,
                "created": r.created,
                "files": r.files,
                "bytes": r.bytes,
            });
            if let Some((reason, at)) = &r.failed {
                v["reason"] = json!(reason);
                v["failed_at"] = json!(at);
            }
            if let Some(m) = &r.message {
                v["message"] = json!(m);
            }
            v
        })
        .collect();
    json!({
        "site": site.name(),
        "current": current,
        "previous": previous,
        "releases": releases,
    })
}

/// `list SITE [--json]`.
pub fn list(cfg: &Config, name: &str, as_json: bool) -> Result<()> {
    let site = site(cfg, name)?;
    if !site.root_exists() {
        // A root not made yet is waited for, not an error (SPEC): the site has no
        // releases, and says so in the shape `status` gives it, exit 0, so a script
        // listing every configured site does not fail on one not deployed yet.
        if as_json {
            return print_json(&json!({"site": site.name(), "root_missing": true,
                "current": null, "previous": null, "releases": []}));
        }
        return out(&format!(
            "{}: no releases (root {} does not exist yet; `{}` creates it)",
            site.name(),
            site.root().display(),
            cfg.init_command(site.name())
        ));
    }
    let journal = match Journal::load(&site) {
        Ok(j) => j,
        // Still one JSON document on stdout, in the shape `status` gives such a site.
        Err(e) if as_json => {
            print_json(&json!({"site": site.name(), "error": e.to_string(),
                "current": null, "previous": null, "releases": []}))?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let doc = list_doc(&site, &journal);
    if as_json {
        return print_json(&doc);
    }
    let rows = doc["releases"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return out(&format!("{}: no releases", site.name()));
    }
    // Ids run to 128 characters (SPEC): the ID column is as wide as the longest, or the
    // rows after a long one no longer line up under the header.
    let w = rows
        .iter()
        .map(|r| r["id"].as_str().map_or(0, |s| s.chars().count()))
        .max()
        .unwrap_or(0)
        .max(28);
    out(&format!(
        "{:<w$} {:<9} {:<20} {:>8} {:>12}  NOTE",
        "ID", "STATE", "CREATED", "FILES", "BYTES"
    ))?;
    for r in rows {
        let mut note = String::new();
        if r["pinned"] == json!(true) {
            note.push_str("pinned ");
        }
        if let Some(reason) = r["reason"].as_str() {
            // A reason quotes a hook's stderr, often several lines: one row per release,
            // or the lines that follow read as rows of their own.
            note.push_str(&reason.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        out(&format!(
            "{:<w$} {:<9} {:<20} {:>8} {:>12}  {}",
            r["id"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["created"].as_str().unwrap_or(""),
            // A JSON value ignores width and alignment; a string keeps the columns.
            r["files"].to_string(),
            r["bytes"].to_string(),
            note.trim_end()
        ))?;
    }
    Ok(())
}

/// The `status --json` document: `{"sites": [...]}`; with a SITE named, that site's object
/// at the top level (as `list --json` prints it), its `sites` key kept for scripts written
/// against the list-only shape.
fn status_doc(named: bool, docs: Vec<Value>) -> Value {
    match docs.as_slice() {
        [one] if named => {
            let mut doc = one.clone();
            doc["sites"] = json!(docs);
            doc
        }
        _ => json!({ "sites": docs }),
    }
}

/// `status [SITE] [--json]`.
pub fn status(cfg: &Config, only: Option<&str>, as_json: bool) -> Result<()> {
    let names: Vec<String> = match only {
        Some(n) => vec![site(cfg, n)?.name().to_string()],
        None => cfg.sites.keys().cloned().collect(),
    };
    let mut docs = Vec::new();
    // A site whose state cannot be read must not hide the others: it gets a document with
    // its `error`, the rest are shown, and the command still fails. Named alone, it still
    // gets its document: a monitor piping `status shop --json` to `jq` reads the error
    // there instead of an empty stdout.
    let mut failed = None;
    for name in &names {
        let site = site(cfg, name)?;
        // The same keys as any other site, so monitoring need not special-case it.
        let blank = || {
            json!({"site": name, "current": null, "previous": null, "releases": [],
                "pinned": [], "failed": [], "drift": null, "last_event": null})
        };
        if !site.root_exists() {
            let mut doc = blank();
            doc["root_missing"] = json!(true);
            docs.push(doc);
            continue;
        }
        let journal = match Journal::load(&site) {
            Ok(j) => j,
            Err(e) => {
                let mut doc = blank();
                doc["error"] = json!(e.to_string());
                docs.push(doc);
                failed.get_or_insert(e);
                continue;
            }
        };
        let mut doc = list_doc(&site, &journal);
        let state = journal.state();
        // The same releases as `releases`: one deleted by hand is in neither list.
        let on_disk = || {
            state
                .live_newest_first()
                .filter(|r| site.release_exists(&r.id))
        };
        doc["pinned"] = json!(on_disk()
            .filter(|r| r.pinned)
            .map(|r| r.id.clone())
            .collect::<Vec<_>>());
        doc["failed"] = json!(on_disk()
            .filter(|r| r.failed.is_some())
            .map(|r| r.id.clone())
            .collect::<Vec<_>>());
        doc["drift"] = match verify::last(&site) {
            Some(r) => json!({"release": r.release, "checked": r.checked, "paths": r.drift}),
            None => Value::Null,
        };
        doc["last_event"] = match &state.last {
            Some(rec) => serde_json::to_value(rec).unwrap_or(Value::Null),
            None => Value::Null,
        };
        docs.push(doc);
    }
    // SPEC's exit 1 covers a command that "found a problem (drift, ...)": a monitor running
    // `status` sees drift in the exit code, not only in the output it may not parse.
    let drifted = drift_shown(&docs);
    let shown = match as_json {
        true => print_json(&status_doc(only.is_some(), docs)),
        false => print_status(cfg, docs),
    };
    match (failed, drifted) {
        (Some(e), _) => Err(e),
        (None, Some(drift)) => shown.and(Err(Error::Failed(drift))),
        (None, None) => shown,
    }
}

/// What the status documents say drifted (site, release, path count), if anything did.
fn drift_shown(docs: &[Value]) -> Option<String> {
    let found: Vec<String> = docs
        .iter()
        .filter_map(|d| {
            let n = d["drift"]["paths"].as_array().map_or(0, Vec::len);
            (n > 0).then(|| {
                format!(
                    "site {} release {} ({})",
                    d["site"].as_str().unwrap_or(""),
                    d["drift"]["release"].as_str().unwrap_or(""),
                    paths(n)
                )
            })
        })
        .collect();
    (!found.is_empty()).then(|| format!("drift found: {}", found.join("; ")))
}

/// "1 path" or "N paths", as `status`, `verify` and their errors count drifted paths.
fn paths(n: usize) -> String {
    format!("{n} {}", if n == 1 { "path" } else { "paths" })
}

/// `status` for people: one block per site document.
fn print_status(cfg: &Config, docs: Vec<Value>) -> Result<()> {
    if docs.is_empty() {
        return out(&format!(
            "no sites configured in {} (add [sites.NAME] there, or a file in sites.d/)",
            cfg.path.display()
        ));
    }
    for d in docs {
        let list = |k: &str| {
            d[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty())
                // A blank after "pinned:" reads like a value that failed to print.
                .unwrap_or_else(|| "(none)".to_string())
        };
        let drift = match &d["drift"] {
            Value::Null => "not checked yet".to_string(),
            v => {
                let n = v["paths"].as_array().map_or(0, Vec::len);
                let checked = v["release"].as_str().unwrap_or("");
                let found = if n == 0 {
                    format!(
                        "none in {checked} (checked {})",
                        v["checked"].as_str().unwrap_or("")
                    )
                } else {
                    format!("{} in {checked}", paths(n))
                };
                // The check may predate the current release: "none in a1" beside a
                // current a3 read as a clean bill for a3.
                match d["current"].as_str() {
                    Some(current) if current != checked => {
                        format!("{current} not checked yet (last check: {found})")
                    }
                    _ => found,
                }
            }
        };
        let last = match &d["last_event"] {
            Value::Null => "none".to_string(),
            v => format!(
                "{} {} {}",
                v["at"].as_str().unwrap_or(""),
                v["op"].as_str().unwrap_or(""),
                v["release"].as_str().unwrap_or("")
            ),
        };
        if let Some(e) = d["error"].as_str() {
            out(&format!(
                "site {}\n  error:    {e}",
                d["site"].as_str().unwrap_or("")
            ))?;
            continue;
        }
        if d["root_missing"] == json!(true) {
            let root = cfg
                .sites
                .get(d["site"].as_str().unwrap_or(""))
                .map(|c| c.root.display().to_string())
                .unwrap_or_default();
            out(&format!(
                "site {}\n  root:     {root} does not exist yet (the service waits for it; `{}` creates it)",
                d["site"].as_str().unwrap_or(""),
                cfg.init_command(d["site"].as_str().unwrap_or("")),
            ))?;
            continue;
        }
        out(&format!(
            "site {}\n  current:  {}\n  previous: {}\n  releases: {}\n  pinned:   {}\n  failed:   {}\n  drift:    {}\n  last:     {}",
            d["site"].as_str().unwrap_or(""),
            d["current"].as_str().unwrap_or("(none)"),
            d["previous"].as_str().unwrap_or("(none)"),
            d["releases"].as_array().map_or(0, Vec::len),
            list("pinned"),
            list("failed"),
            drift,
            last.trim_end(),
        ))?;
    }
    Ok(())
}

/// `activate SITE ID [--force]`.
pub fn activate(
    cfg: &Config,
    name: &str,
    id: &str,
    force: bool,
    wait: &Option<String>,
) -> Result<()> {
    usage_id(id)?;
    let site = site(cfg, name)?;
    let _lock = op_lock(&site, wait)?;
    let mut journal = Journal::load(&site)?;
    let failed_before = is_failed(&journal, id);
    let result = activate::activate(
        &site,
        &mut journal,
        id,
        activate::Options {
            force,
            just_built: false,
        },
    );
    // SPEC prunes after each activation; a staged release activated here is one, and so
    // is one that its hooks or health check failed (as after an upload, where the new
    // failure may push an older failed release past `keep_failed`). A refusal changed
    // nothing and prunes nothing. The outcome is decided, so a pruning failure is only
    // reported.
    if result.is_ok() || (!failed_before && is_failed(&journal, id)) {
        if let Err(e) = retention::prune(&site, &mut journal) {
            tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e,
                "pruning failed; will retry after the next release");
        }
    }
    if result? {
        out(&format!("{}: current -> {id}", site.name()))
    } else {
        // Said as `rollback --to` says it: nothing switched, no hook ran.
        out(&format!("{}: release {id} is already current", site.name()))
    }
}

/// True when the journal has release `id` marked failed.
fn is_failed(journal: &Journal, id: &str) -> bool {
    journal.state().get(id).is_some_and(|r| r.failed.is_some())
}

/// `rollback SITE [--to ID] [--force]`.
pub fn rollback(
    cfg: &Config,
    name: &str,
    to: Option<&str>,
    force: bool,
    wait: &Option<String>,
) -> Result<()> {
    if let Some(t) = to {
        usage_id(t)?;
    }
    let site = site(cfg, name)?;
    let _lock = op_lock(&site, wait)?;
    let mut journal = Journal::load(&site)?;
    let done = activate::rollback(&site, &mut journal, to, force)?;
    if let Some(s) = &done.skipped {
        out(&format!(
            "{}: skipped release {s}: its last verify found drift (`rollback --to {s} --force` \
             goes there anyway)",
            site.name()
        ))?;
    }
    if done.switched {
        out(&format!(
            "{}: rolled back, current -> {}",
            site.name(),
            done.to
        ))
    } else {
        out(&format!(
            "{}: release {} is already current",
            site.name(),
            done.to
        ))
    }
}

/// `verify SITE [ID] [--all]`.
pub fn verify(cfg: &Config, name: &str, id: Option<&str>, all: bool, as_json: bool) -> Result<()> {
    if let Some(i) = id {
        usage_id(i)?;
    }
    let site = site(cfg, name)?;
    require_root(&site)?;
    // It records what it found (drift state) beside the service's.
    act_as_site_owner(&site)?;
    let journal = Journal::load(&site)?;
    let current = site.current_id();
    let ids: Vec<String> = if all {
        journal
            .state()
            .live_newest_first()
            .filter(|r| site.release_exists(&r.id))
            .map(|r| r.id.clone())
            .collect()
    } else {
        match id.map(str::to_string).or(current.clone()) {
            Some(i) => vec![i],
            None => {
                return Err(Error::Failed(format!(
                    "site {}: no current release to verify",
                    site.name()
                )))
            }
        }
    };
    let mut reports = Vec::new();
    // With --all, a release that cannot be verified (no stored manifest) is reported and
    // the others are still checked; the command then fails.
    let mut unverifiable = Vec::new();
    for i in &ids {
        let report = match verify::verify_release(&site, i) {
            Ok(r) => r,
            Err(e) if all => {
                tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), release = %i, reason = %e, "cannot verify release");
                unverifiable.push((i.clone(), e.to_string()));
                continue;
            }
            Err(e) => return Err(e),
        };
        // Every release's result is kept (activations refuse a drifted one, and a clean
        // re-check lifts that); only the current release's is what `status` shows.
        if current.as_deref() == Some(i.as_str()) {
            verify::record(&site, &report)?;
        } else {
            verify::record_release(&site, &report)?;
        }
        reports.push(report);
    }
    let drifted = reports.iter().any(|r| !r.drift.is_empty());
    if as_json {
        let mut releases: Vec<Value> = reports
            .iter()
            .map(|r| json!({"id": r.release, "ok": r.drift.is_empty(), "drift": r.drift}))
            .collect();
        releases.extend(
            unverifiable
                .iter()
                .map(|(i, e)| json!({"id": i, "ok": false, "drift": [], "error": e})),
        );
        print_json(&json!({"site": site.name(), "releases": releases}))?;
    } else {
        if reports.is_empty() {
            // `--all` on a site without releases: say so rather than print nothing.
            out(&format!("{}: no releases to verify", site.name()))?;
        }
        for r in &reports {
            if r.drift.is_empty() {
                out(&format!("{} {}: OK", site.name(), r.release))?;
            } else {
                let n = r.drift.len();
                out(&format!(
                    "{} {}: DRIFT ({})",
                    site.name(),
                    r.release,
                    paths(n)
                ))?;
                for d in &r.drift {
                    out(&format!("  {d}"))?;
                }
            }
        }
        for (i, e) in &unverifiable {
            out(&format!("{} {i}: CANNOT VERIFY: {e}", site.name()))?;
        }
    }
    if drifted {
        return Err(Error::Failed("drift detected".into()));
    }
    if !unverifiable.is_empty() {
        return Err(Error::Failed(format!(
            "{} release(s) could not be verified",
            unverifiable.len()
        )));
    }
    Ok(())
}

/// `prune SITE [--dry-run]`.
pub fn prune(cfg: &Config, name: &str, dry_run: bool, wait: &Option<String>) -> Result<()> {
    let site = site(cfg, name)?;
    let _lock = lock_for(&site, dry_run, wait)?;
    let mut journal = Journal::load(&site)?;
    let doomed = if dry_run {
        retention::plan_site(&site, &journal)?
    } else {
        retention::prune(&site, &mut journal)?
    };
    if doomed.is_empty() {
        return out(&format!("{}: nothing to prune", site.name()));
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for d in doomed {
        out(&format!("{}: {verb} {} ({})", site.name(), d.id, d.why))?;
    }
    Ok(())
}

/// `heal SITE [--dry-run]`.
pub fn heal(cfg: &Config, name: &str, dry_run: bool, wait: &Option<String>) -> Result<()> {
    let site = site(cfg, name)?;
    // Taking the lock makes a missing layout again (a dry run's does not, and its pass
    // says what it would make): looked at first, so that is said too.
    let missing = match dry_run {
        false => heal::missing_layout(&site, heal::Uploads::Recreate),
        true => Vec::new(),
    };
    let _lock = lock_for(&site, dry_run, wait)?;
    let mut journal = Journal::load(&site)?;
    let mut outcome = heal::heal(&site, &mut journal, dry_run)?;
    outcome
        .repairs
        .splice(0..0, heal::layout_repairs(&site, &missing, dry_run));
    if dry_run {
        // Done before the lock by every other command; here only said.
        let locks = heal::repair_locks(&site, true)?;
        outcome.repairs.splice(0..0, locks);
    }
    let prefix = if dry_run { "would " } else { "" };
    // Every line names the site, as the other commands' lines do, so the output of a
    // loop over sites still says which site each repair was in.
    for r in &outcome.repairs {
        out(&format!("{}: {prefix}{} ({})", site.name(), r.what, r.why))?;
    }
    for r in &outcome.reports {
        out(&format!("{}: note: {r}", site.name()))?;
    }
    if !outcome.in_service.is_empty() {
        // Redoing them here would log a second `upload.detected` for one upload and could
        // build it while its files are still arriving; the service resumes them once the
        // lock is free.
        out(&format!(
            "{}: upload {} claimed by the running service, left to it",
            site.name(),
            outcome.in_service.join(", ")
        ))?;
    } else if !dry_run {
        // An upload still waiting for files in flight is left to the service: a healing
        // pass must not hold the lock, and keep a rollback out, for up to upload_timeout.
        let run = pipeline::run_pending_yielding(&site, &AtomicBool::new(false), false, None)?;
        report_outcomes(&site, &run.outcomes)?;
        if let Some(w) = run.waiting {
            out(&format!(
                "{}: upload {} is waiting for files still in flight ({}); the service \
                 finishes it once they are complete",
                site.name(),
                w.id,
                w.paths.join(", ")
            ))?;
        }
    }
    if outcome.repairs.is_empty() && outcome.reports.is_empty() && outcome.in_service.is_empty() {
        out(&format!("{}: nothing to heal", site.name()))?;
    }
    // A problem healing must leave to an operator is one found and not fixed: exit 1
    // (SPEC), so a script or timer running `heal` notices it. A dry run only says what a
    // pass would do, and succeeds.
    if !dry_run && !outcome.reports.is_empty() {
        let n = outcome.reports.len();
        return Err(Error::Failed(format!(
            "site {}: {n} {} left for an operator (the notes above)",
            site.name(),
            if n == 1 { "problem" } else { "problems" }
        )));
    }
    Ok(())
}

/// `pin` / `unpin`.
pub fn pin(cfg: &Config, name: &str, id: &str, pinned: bool, wait: &Option<String>) -> Result<()> {
    usage_id(id)?;
    let site = site(cfg, name)?;
    let _lock = op_lock(&site, wait)?;
    let mut journal = Journal::load(&site)?;
    let Some(info) = journal.state().get(id).filter(|_| site.release_exists(id)) else {
        return Err(site.no_release(id));
    };
    if info.pinned == pinned {
        // The wanted state holds: exit 0, but say so rather than claim a change, and add
        // no journal record (`last_event` would show a pin that changed nothing).
        return out(&format!(
            "{}: {id} is {} (nothing to do)",
            site.name(),
            if pinned {
                "already pinned"
            } else {
                "not pinned"
            }
        ));
    }
    let release = id.to_string();
    journal.append(if pinned {
        Op::Pinned { release }
    } else {
        Op::Unpinned { release }
    })?;
    // The journal has it; the copy only matters if the journal is lost, so failing to
    // write it is said, not made the command's failure.
    if let Err(e) = crate::release::store::save_pins(&site, journal.state()) {
        tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e,
            "cannot save the copy of the pins beside the journal");
    }
    out(&format!(
        "{}: {id} {}",
        site.name(),
        if pinned { "pinned" } else { "unpinned" }
    ))
}

/// Prints one line per outcome; returns what went wrong, for the command's error (exit 1),
/// or None when every upload was finalized (and activated when asked).
fn report_outcomes(site: &Site, outcomes: &[Outcome]) -> Result<Option<String>> {
    let mut problems = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Released(id) => out(&format!("{}: release {id} finalized", site.name()))?,
            Outcome::Unchanged(id) => {
                // A no-op, but not a success when that release failed its checks: a CI
                // job retrying a failed deploy must not report it as done.
                let journal = Journal::load(site)?;
                let failed = journal.state().get(id).and_then(|r| r.failed.clone());
                match failed {
                    Some((reason, _)) => {
                        problems.push(format!(
                            "release {id} failed before ({reason}); an identical upload \
                             changes nothing: fix the build and upload it under a new id \
                             (or `release-keeper activate {} {id} --force` to retry it)",
                            site.name()
                        ));
                        out(&format!(
                            "{}: release {id} unchanged (identical upload), and failed: {reason}",
                            site.name()
                        ))?
                    }
                    None => out(&format!(
                        "{}: release {id} unchanged (identical upload)",
                        site.name()
                    ))?,
                }
            }
            Outcome::Activated(id) => out(&format!(
                "{}: release {id} unchanged (identical upload); staged before, now activated",
                site.name()
            ))?,
            Outcome::Rejected(r) => {
                problems.push("the upload was rejected".to_string());
                out(&format!("{}: upload rejected: {r}", site.name()))?
            }
            Outcome::Deferred(r) => {
                problems.push("the upload was deferred".to_string());
                out(&format!("{}: upload deferred: {r}", site.name()))?
            }
            Outcome::ActivationFailed(id, r) => {
                // The release exists whatever its checks said; the reason says where
                // `current` is now (rolled back, stays on it, or never switched), so the
                // line must not claim "not activated" when it is current.
                problems.push(format!(
                    "release {id} was finalized but its activation failed"
                ));
                out(&format!(
                    "{}: release {id} finalized; activation failed: {r}",
                    site.name()
                ))?
            }
        }
    }
    Ok((!problems.is_empty()).then(|| format!("site {}: {}", site.name(), problems.join("; "))))
}

/// `finalize SITE [--id ID] [--no-activate]`.
pub fn finalize(
    cfg: &Config,
    name: &str,
    id: Option<&str>,
    no_activate: bool,
    wait: &Option<String>,
) -> Result<()> {
    let site = site(cfg, name)?;
    if let Some(i) = id {
        usage_id(i)?;
    }
    let _lock = op_lock(&site, wait)?;
    marker::claim_for_finalize(
        &site,
        &MarkerSpec {
            id: id.map(str::to_string),
            activate: !no_activate,
            message: Some("finalize command".into()),
        },
    )?;
    let outcomes = pipeline::run_pending(&site, &AtomicBool::new(false), false)?;
    match report_outcomes(&site, &outcomes)? {
        Some(problem) => Err(Error::Failed(problem)),
        None => Ok(()),
    }
}

/// `manifest DIR [-o FILE]`; `json_logs` is `--log-format json`.
pub fn manifest(dir: &Path, output: Option<&Path>, json_logs: bool) -> Result<()> {
    // A DIR that is no directory is a wrong argument (exit 2), as `run --root FILE` is.
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Usage(format!(
                "manifest {}: not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "manifest {}: no such directory",
                dir.display()
            )))
        }
        Err(_) => {}
    }
    let defaults = SiteConfig::with_defaults("manifest", PathBuf::from("/"));
    // `-o DIR/OTHER-NAME` (a site with another `manifest`) or `-o DIR/meta/sums`: a re-run
    // must not list the previous output, whose hash is stale by the time it is rewritten.
    let own = match output {
        None => Some(PathBuf::from(&defaults.manifest)),
        Some(p) if p == Path::new("-") => None,
        // A link (`-o build/SHA256SUMS -> out/sums`) is written through: what it names is
        // the output that must not list itself.
        Some(p) => inside(
            dir,
            &fsops::follow_links(p).unwrap_or_else(|_| p.to_path_buf()),
        ),
    };
    // The output is the build's manifest; written elsewhere (stdout, another directory),
    // a `SHA256SUMS` in the build is taken for the stale one of an earlier run. With the
    // output in the build under another name, a `SHA256SUMS` there is a file of the build
    // like any other, which a site whose `manifest` is that other name wants listed.
    let mut names = vec![Path::new(&defaults.marker)];
    names.push(own.as_deref().unwrap_or(Path::new(&defaults.manifest)));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut buf = Vec::new();
    let written = manifest::write_for_dir(dir, &names, &mut buf, threads)
        .map_err(|e| Error::Failed(e.to_string()))?;
    let n = written.files;
    // Symlinks are not listed, so the manifest is right either way; but one the keeper
    // would reject is better found now, in CI, than as a rejected deploy.
    for (rel, target) in &written.links {
        if let Err(why) = crate::release::symlinks::check_inside(dir, rel, target, &[]) {
            let why = crate::events::printable(&why);
            if json_logs {
                // With `--log-format json` stderr is one JSON object per line (SPEC): a
                // plain warning line broke `2>&1 | jq` in the CI job it was meant for.
                tracing::warn!(event = crate::events::MANIFEST_BAD_SYMLINK, site = "",
                    path = %rel.display(), reason = %why,
                    "the keeper rejects an upload holding this symlink");
            } else {
                crate::events::print_stderr(&format!(
                    "warning: {why}: the keeper rejects an upload holding it"
                ));
            }
        }
    }
    match output {
        Some(p) if p == Path::new("-") => {
            std::io::stdout()
                .write_all(&buf)
                .at(Path::new("<stdout>"))?;
        }
        other => {
            let path = other.map_or_else(|| dir.join(&defaults.manifest), Path::to_path_buf);
            fsops::write_output(&path, &buf)?;
            let noun = if n == 1 { "file" } else { "files" };
            // Human output goes to stdout (SPEC); only with `-o -`, where stdout is the
            // manifest itself, is there nothing to say.
            out(&format!("wrote {} ({n} {noun})", path.display()))?;
        }
    }
    Ok(())
}

/// Where `file` lies inside directory `dir`, as a path relative to it (symlinks resolved,
/// as the kernel would to write it); `None` when outside, or when its directory does not
/// exist (then it is nowhere in the tree yet).
fn inside(dir: &Path, file: &Path) -> Option<PathBuf> {
    let parent = file.parent().filter(|d| !d.as_os_str().is_empty());
    let parent = std::fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()?;
    let dir = std::fs::canonicalize(dir).ok()?;
    let rel = parent.strip_prefix(&dir).ok()?;
    Some(rel.join(file.file_name()?))
}

/// `init SITE`.
pub fn init(cfg: &Config, name: &str, owner: Option<&str>) -> Result<()> {
    let site = site(cfg, name)?;
    let owner = init_owner(owner)?;
    // The root is the operator's path: a symlink to a directory (`/var/www/shop ->
    // /srv/shop`) is that directory, as it is for every other command.
    // Parents it makes are 0755 whatever the umask (`sudo` under `umask 077`): the
    // `--owner` user, and the web server, must be able to reach the root through them.
    if !site.root().is_dir() {
        fsops::ensure_dir_and_parents(site.root(), 0o755, 0o755)?;
    }
    site.ensure_layout()?;
    tighten_keeper_dirs(&site)?;
    let Some(user) = owner else {
        return out(&format!(
            "{}: layout ready at {} (uploaders write to {})",
            site.name(),
            site.root().display(),
            site.deploy_cache().display()
        ));
    };
    // `sudo release-keeper init shop` must leave a layout the service (`User=`) can work
    // in: a root-owned `.release-keeper/` (0750) keeps it from even taking its lock. The
    // root and the keeper's directories are its own; the state inside `.release-keeper/`
    // too (a lock or journal made by an earlier command run as root).
    let dirs = [
        // The directory a symlinked root leads to, not the link.
        std::fs::canonicalize(site.root()).unwrap_or_else(|_| site.root().to_path_buf()),
        site.deploy_cache(),
        site.releases(),
        site.shared(),
    ];
    for d in &dirs {
        fsops::chown(d, user.uid, user.gid)?;
    }
    fsops::chown_tree(&site.state(), user.uid, user.gid)?;
    // Uploaders reach deploy-cache/ through the group, whatever the umask it was made with.
    fsops::set_mode(&site.deploy_cache(), 0o775)?;
    out(&format!(
        "{}: layout ready at {}, owned by {} (uploaders write to {}, group {})",
        site.name(),
        site.root().display(),
        user.name,
        site.deploy_cache().display(),
        nix::unistd::Group::from_gid(user.gid)
            .ok()
            .flatten()
            .map_or_else(|| user.gid.to_string(), |g| g.name)
    ))
}

/// Takes away what no one but the keeper may have on directories made before `init` (by
/// hand, under another umask): write for group and others on `releases/` (whoever may
/// write there can rename one release over another and change what `current` serves),
/// and on `.release-keeper/` and its directories anything beyond 0750 (its journal and
/// manifests are what healing and drift checks trust). Each change is said.
fn tighten_keeper_dirs(site: &Site) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dirs = [
        (site.releases(), 0o022),
        (site.state(), 0o027),
        (site.manifests(), 0o027),
        (site.claims(), 0o027),
    ];
    for (dir, taken) in dirs {
        let meta = std::fs::symlink_metadata(&dir).at(&dir)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() && mode & taken != 0 {
            fsops::set_mode(&dir, mode & !taken)?;
            out(&format!(
                "{}: {} was mode {mode:04o}, now {:04o}",
                site.name(),
                dir.display(),
                mode & !taken
            ))?;
        }
    }
    Ok(())
}

/// The user service runs as, by default, under the packaged unit (`User=`).
const SERVICE_USER: &str = "release-keeper";

/// Whom `init` gives the layout to: `--owner USER`, else (as root) the service's user when
/// it exists, else nobody (the caller, presumably the service's user, owns what it makes).
fn init_owner(flag: Option<&str>) -> Result<Option<nix::unistd::User>> {
    let root = nix::unistd::geteuid().is_root();
    let Some(name) = flag else {
        if !root {
            return Ok(None);
        }
        return nix::unistd::User::from_name(SERVICE_USER)
            .map_err(|e| Error::Failed(format!("cannot look up user {SERVICE_USER:?}: {e}")));
    };
    let user = nix::unistd::User::from_name(name)
        .map_err(|e| Error::Failed(format!("cannot look up user {name:?}: {e}")))?
        .ok_or_else(|| Error::Usage(format!("--owner {name:?}: no such user")))?;
    if !root && user.uid != nix::unistd::geteuid() {
        return Err(Error::Failed(format!(
            "--owner {name}: only root can give the layout to another user"
        )));
    }
    Ok(Some(user))
}

/// Why the program of a hook's argv cannot run as it stands, when that can be told now:
/// an absolute path that is missing, not a file, or not executable. (A bare name is looked
/// up in the service's PATH at run time, which may differ from this shell's.)
fn program_problem(argv: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let name = argv.first()?;
    let program = Path::new(name);
    if !name.contains('/') {
        // Looked up in the hooks' fixed PATH, not the caller's: what runs the hook is the
        // service, whose environment a shell's `which` says nothing about.
        let found = crate::hooks::HOOK_PATH.split(':').any(|dir| {
            std::fs::metadata(Path::new(dir).join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
        return (!found).then(|| {
            format!(
                "{name}: not found in the hooks' PATH ({}); give its absolute path",
                crate::hooks::HOOK_PATH
            )
        });
    }
    if !program.is_absolute() {
        // Relative to the release (the hook's working directory): only known per release.
        return None;
    }
    match std::fs::metadata(program) {
        Err(e) => Some(format!("{}: {e}", program.display())),
        Ok(m) if !m.is_file() => Some(format!("{} is not a file", program.display())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Some(format!("{} is not executable", program.display()))
        }
        Ok(_) => None,
    }
}

/// `check-config`.
pub fn check_config(flag: Option<&Path>) -> Result<()> {
    let cfg = load_config(flag, None)?;
    for s in cfg.sites.values() {
        if !s.root.is_dir() {
            tracing::warn!(event = crate::events::SITE_WAITING, site = %s.name, root = %s.root.display(),
                "root does not exist yet; the service will wait for it");
        }
        for (key, argv) in [
            ("before_activate", &s.before_activate),
            ("after_activate", &s.after_activate),
            ("health_check", &s.health_check),
        ] {
            if let Some(why) = argv.as_deref().and_then(program_problem) {
                tracing::warn!(event = crate::events::SITE_ERROR, site = %s.name, key,
                    reason = %format!("{key}: {why}; every activation would fail on it"),
                    "hook program not runnable");
            }
        }
        // Looked up when a hook runs (the user may be created before the first deploy),
        // so only a warning here; but every hook would fail on it, hence every activation.
        let has_hooks =
            s.before_activate.is_some() || s.after_activate.is_some() || s.health_check.is_some();
        if let Some(name) = s.hook_user.as_deref().filter(|_| has_hooks) {
            let why = match nix::unistd::User::from_name(name) {
                Ok(Some(_)) => None,
                Ok(None) => Some(format!("hook_user {name:?} does not exist")),
                Err(e) => Some(format!("cannot look up hook_user {name:?}: {e}")),
            };
            if let Some(why) = why {
                tracing::warn!(event = crate::events::SITE_ERROR, site = %s.name, key = "hook_user",
                    reason = %format!("{why}; every hook, so every activation, would fail on it"),
                    "hook user not found");
            }
        }
        // The collector's directory comes with node_exporter, which may not be installed
        // yet: a warning, as the service keeps working and writes the file once it exists.
        if let Some(dir) = s.metrics_file.as_deref().and_then(Path::parent) {
            if !dir.is_dir() {
                tracing::warn!(event = crate::events::SITE_ERROR, site = %s.name, key = "metrics_file",
                    reason = %format!("metrics_file: directory {} does not exist; the metrics file cannot be written",
                        dir.display()),
                    "metrics directory missing");
            }
        }
    }
    out(&format!(
        "{}: OK ({})",
        cfg.path.display(),
        match cfg.sites.len() {
            0 => "no sites configured".to_string(),
            n => format!(
                "{n} site{}: {}",
                if n == 1 { "" } else { "s" },
                cfg.sites.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    ))
}
