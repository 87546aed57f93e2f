//! The healing pass: repairs what crashes, hand edits and deleted links leave behind, and
//! reports what it must not touch. Run at start, on SIGHUP, every `heal_interval`, on
//! inotify events in the root, and by `heal`. With `dry_run` it only says what it would do.

use std::fs;
use std::path::{Path, PathBuf};

use crate::activate;
use crate::error::{IoContext, Result};
use crate::events;
use crate::fsops;
use crate::release::store::{self, Journal};
use crate::site::{self, Site};
use crate::upload::marker;

/// One repair (done, or to be done in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// What was (or would be) done.
    pub what: String,
    /// Why.
    pub why: String,
}

/// The outcome of a pass.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Repairs made (or planned).
    pub repairs: Vec<Repair>,
    /// Problems reported but not touched.
    pub reports: Vec<String>,
}

fn leftovers(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Runs one healing pass over `site`. The caller holds the site's operation lock.
pub fn heal(site: &Site, journal: &mut Journal, dry_run: bool) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut repair = |what: String, why: &str, out: &mut Outcome| {
        if !dry_run {
            tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), what = %what,
                reason = why, "repaired");
        }
        out.repairs.push(Repair {
            what,
            why: why.to_string(),
        });
    };

    if !dry_run {
        site.ensure_layout()?;
    }

    for p in leftovers(
        &site.releases(),
        &[fsops::PARTIAL_PREFIX, fsops::TMP_PREFIX],
    ) {
        if !dry_run {
            fsops::trash_and_remove(&p, &site.trash())?;
        }
        repair(
            format!("removed {}", p.display()),
            "leftover of an interrupted build",
            &mut out,
        );
    }
    for dir in [
        site.root().to_path_buf(),
        site.state(),
        site.manifests(),
        site.claims(),
    ] {
        for p in leftovers(&dir, &[fsops::TMP_PREFIX]) {
            if !dry_run {
                fsops::remove_tree(&p)?;
            }
            repair(
                format!("removed {}", p.display()),
                "leftover temporary file or link",
                &mut out,
            );
        }
    }
    if !dry_run {
        for p in fsops::empty_trash(&site.trash())? {
            tracing::debug!(site = site.name(), path = %p.display(), "trash emptied");
        }
        if let Some(id) = activate::resume_trial(site, journal)? {
            out.repairs.push(Repair {
                what: format!("resolved the interrupted activation of {id}"),
                why: "crash between the switch and the health verdict".into(),
            });
        }
    } else if let Some((id, _)) = journal.state().open_trial {
        out.repairs.push(Repair {
            what: format!("resolve the interrupted activation of {id}"),
            why: "crash between the switch and the health verdict".into(),
        });
    }

    heal_current(site, journal, dry_run, &mut out, &mut repair)?;

    for (link, target) in &site.cfg.links {
        let path = site.root().join(link);
        let ok = fs::read_link(&path).ok().as_deref() == Some(target.as_path());
        if ok {
            continue;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_symlink() => out.reports.push(format!(
                "{} is not a symlink; expected a link to {} (left alone)",
                path.display(),
                target.display()
            )),
            _ => {
                if !dry_run {
                    activate::ensure_links(site)?;
                }
                repair(
                    format!("linked {} -> {}", link.display(), target.display()),
                    "configured link missing or wrong",
                    &mut out,
                );
            }
        }
    }
    for entry in &site.cfg.shared {
        let p = site.shared().join(entry);
        if fs::symlink_metadata(&p).is_err() {
            if !dry_run {
                fsops::ensure_dir(&p, 0o755)?;
            }
            repair(
                format!("created {}", p.display()),
                "configured shared entry missing",
                &mut out,
            );
        }
    }

    for p in marker::pending(site)? {
        let path = match &p {
            marker::Pending::Raw(p) | marker::Pending::Resolved(p, _) => p,
        };
        out.reports.push(format!(
            "pending upload claim {} (processed next)",
            path.display()
        ));
    }
    let state = journal.state();
    for id in store::release_dirs_on_disk(site)? {
        if state.get(&id).is_none() {
            out.reports.push(format!(
                "releases/{id} was not made by release-keeper (not counted, never deleted)"
            ));
        }
    }
    Ok(out)
}

fn heal_current(
    site: &Site,
    journal: &Journal,
    dry_run: bool,
    out: &mut Outcome,
    repair: &mut impl FnMut(String, &str, &mut Outcome),
) -> Result<()> {
    let current = site.current();
    let meta = fs::symlink_metadata(&current).ok();
    let problem = match &meta {
        None => Some("current is missing"),
        Some(m) if m.file_type().is_symlink() => {
            let target = fs::read_link(&current).at(&current)?;
            match site::release_id_of_target(&target, site.root()) {
                None => Some("current points outside releases/"),
                Some(id) if !site.release(&id).is_dir() => Some("current is dangling"),
                Some(_) if target.is_absolute() => Some("current has an absolute target"),
                Some(_) => None,
            }
        }
        Some(_) => Some("current is not a symlink"),
    };
    let Some(why) = problem else {
        return Ok(());
    };
    let state = journal.state();
    let exists = |id: &str| site.release(id).is_dir();
    let target = state.last_good_activated(exists).or_else(|| {
        state
            .live_newest_first()
            .find(|r| r.failed.is_none() && exists(&r.id))
            .map(|r| r.id.clone())
    });
    let Some(target) = target else {
        if meta.is_some() {
            out.reports.push(format!(
                "{why}, and there is no good release to point it at"
            ));
        }
        return Ok(());
    };
    if let Some(m) = &meta {
        if !m.file_type().is_symlink() {
            let aside = site
                .displaced()
                .join(format!("current.{}", crate::clock::Utc::now().release_id()));
            if !dry_run {
                fsops::ensure_dir(&site.displaced(), 0o750)?;
                fs::rename(&current, &aside).at(&current)?;
            }
            repair(
                format!("moved {} aside to {}", current.display(), aside.display()),
                "current is not a symlink (never deleted)",
                out,
            );
        }
    }
    if !dry_run {
        fsops::swap_symlink(&current, &Site::current_target_for(&target))?;
    }
    repair(format!("pointed current at releases/{target}"), why, out);
    Ok(())
}
