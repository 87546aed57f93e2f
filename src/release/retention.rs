//! Which releases to keep. The policy is a pure function of the journal's state, so it is
//! tested on its own: the newest `keep` good releases by journal order (never by mtime or
//! name), plus `current`, the previous good release and pinned ones; failed releases do
//! not count toward `keep`, the `keep_failed` that failed last are kept for inspection.
//! Directories the keeper did not make are never touched.

use std::collections::BTreeSet;

use crate::error::Result;
use crate::events;
use crate::fsops;
use crate::release::changes;
use crate::release::store::{self, Journal, Op, State};
use crate::site::Site;

/// A release the policy would delete, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    /// Release id.
    pub id: String,
    /// Why it goes.
    pub why: String,
    /// Its regular files, as the journal recorded them.
    pub files: u64,
    /// Their total size in bytes, which deleting it frees (less what is hard-linked).
    pub bytes: u64,
}

/// The deletions the policy asks for. `on_disk` are the ids present in `releases/`.
pub fn plan(
    state: &State,
    current: Option<&str>,
    previous: Option<&str>,
    keep: usize,
    keep_failed: usize,
    on_disk: &BTreeSet<String>,
) -> Vec<Doomed> {
    // The failures kept for inspection are the latest ones: a staged or older release
    // that fails now must not be deleted by the very pruning that follows its failure.
    let mut failures: Vec<_> = state
        .live_newest_first()
        .filter(|r| r.failed.is_some() && on_disk.contains(&r.id))
        .collect();
    failures.sort_by_key(|r| std::cmp::Reverse(r.failed_seq));
    let inspected: BTreeSet<&str> = failures
        .iter()
        .take(keep_failed)
        .map(|r| r.id.as_str())
        .collect();
    let mut good = 0usize;
    let mut out = Vec::new();
    for r in state.live_newest_first() {
        if !on_disk.contains(&r.id) {
            continue;
        }
        let protected =
            Some(r.id.as_str()) == current || Some(r.id.as_str()) == previous || r.pinned;
        if r.failed.is_some() {
            if !inspected.contains(r.id.as_str()) && !protected {
                out.push(Doomed {
                    id: r.id.clone(),
                    why: format!("failed release beyond keep_failed = {keep_failed}"),
                    files: r.files,
                    bytes: r.bytes,
                });
            }
        } else {
            good += 1;
            if good > keep && !protected {
                out.push(Doomed {
                    id: r.id.clone(),
                    why: format!("older than the newest keep = {keep} good releases"),
                    files: r.files,
                    bytes: r.bytes,
                });
            }
        }
    }
    out
}

/// The plan for `site` now.
pub fn plan_site(site: &Site, journal: &Journal) -> Result<Vec<Doomed>> {
    let state = journal.state();
    let (current, previous) =
        state.current_and_previous(site.current_id(), |r| site.release_exists(r));
    let on_disk = store::release_dirs_on_disk(site)?;
    Ok(plan(
        state,
        current.as_deref(),
        previous.as_deref(),
        site.cfg.keep,
        site.cfg.keep_failed,
        &on_disk,
    ))
}

/// Applies the policy: each doomed release leaves `releases/` by one rename, is journaled,
/// then removed. A removal that fails (a file someone else owns) leaves the tree in the
/// trash, out of `releases/`, with a clear error; healing retries it. Returns what was
/// deleted.
pub fn prune(site: &Site, journal: &mut Journal) -> Result<Vec<Doomed>> {
    let doomed = plan_site(site, journal)?;
    for d in &doomed {
        let trashed = fsops::move_to_trash(&site.release(&d.id), &site.trash())?;
        journal.append(Op::Pruned {
            release: d.id.clone(),
        })?;
        // Logged with the journal record, not after the removal: the event then goes with
        // the record exactly once. A keeper killed during the (slow, idle-priority)
        // removal has logged it already, and healing, which finishes the removal, logs it
        // only for a pruning it journals itself (`heal`, `resumed = true`).
        tracing::info!(
            event = events::RELEASE_PRUNED,
            site = site.name(),
            release = %d.id,
            reason = %d.why,
            files = d.files,
            bytes = d.bytes,
            "release pruned"
        );
        let _ = std::fs::remove_file(site.manifest_of(&d.id));
        crate::verify::forget(site, &d.id);
        let removed =
            changes::recorded(site, || fsops::at_idle_io(|| fsops::remove_tree(&trashed)));
        if let Err(e) = removed {
            tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), release = %d.id, reason = %e,
                "pruned release left the releases/ directory but could not be removed fully; healing retries");
        }
    }
    Ok(doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::store::{Record, State};

    fn state(spec: &[(&str, bool)]) -> State {
        let mut recs = Vec::new();
        let mut seq = 0;
        for (id, failed) in spec {
            seq += 1;
            recs.push(Record {
                seq,
                at: String::new(),
                op: Op::Finalized {
                    release: id.to_string(),
                    files: 0,
                    bytes: 0,
                    activate: true,
                    message: None,
                    created: None,
                },
            });
            if *failed {
                seq += 1;
                recs.push(Record {
                    seq,
                    at: String::new(),
                    op: Op::Failed {
                        release: id.to_string(),
                        reason: "x".into(),
                    },
                });
            }
        }
        State::from_records(&recs)
    }

    fn ids(d: &[Doomed]) -> Vec<&str> {
        d.iter().map(|d| d.id.as_str()).collect()
    }

    fn all(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keeps_newest_by_journal_order_not_name() {
        // Journal order differs from name order on purpose.
        let st = state(&[
            ("zeta", false),
            ("alpha", false),
            ("mid", false),
            ("beta", false),
        ]);
        let d = plan(
            &st,
            Some("beta"),
            Some("mid"),
            2,
            2,
            &all(&["zeta", "alpha", "mid", "beta"]),
        );
        assert_eq!(ids(&d), vec!["alpha", "zeta"]);
    }

    #[test]
    fn failed_do_not_count_toward_keep() {
        let st = state(&[
            ("a", false),
            ("b", false),
            ("f1", true),
            ("f2", true),
            ("f3", true),
        ]);
        let d = plan(
            &st,
            Some("b"),
            Some("a"),
            2,
            1,
            &all(&["a", "b", "f1", "f2", "f3"]),
        );
        assert_eq!(ids(&d), vec!["f2", "f1"]);
    }

    #[test]
    fn keep_failed_keeps_the_latest_failures_not_the_newest_releases() {
        let mut st = state(&[("old", false), ("f1", true), ("f2", true), ("cur", false)]);
        // "old" (staged long ago) is activated now and fails: the latest failure.
        let seq = st.releases.iter().map(|r| r.failed_seq).max().unwrap_or(0) + 10;
        st.releases[0].failed = Some(("x".into(), String::new()));
        st.releases[0].failed_seq = seq;
        let d = plan(
            &st,
            Some("cur"),
            None,
            5,
            1,
            &all(&["old", "f1", "f2", "cur"]),
        );
        assert_eq!(ids(&d), vec!["f2", "f1"]);
    }

    #[test]
    fn never_current_previous_pinned_or_foreign() {
        let mut st = state(&[("a", false), ("b", false), ("c", false), ("d", false)]);
        st.releases[1].pinned = true;
        let d = plan(
            &st,
            Some("a"),
            Some("c"),
            1,
            0,
            &all(&["a", "b", "c", "d", "foreign"]),
        );
        assert!(d.is_empty(), "{d:?}");
        let d = plan(
            &st,
            Some("d"),
            Some("c"),
            1,
            0,
            &all(&["a", "b", "c", "d", "foreign"]),
        );
        assert_eq!(ids(&d), vec!["a"]);
    }
}
