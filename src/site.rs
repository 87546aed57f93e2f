//! A site's paths and layout. Every path the keeper touches in a site is derived here, so
//! the whole tool can be pointed at a temporary root in tests.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::SiteConfig;
use crate::error::{Error, Result};
use crate::fsops;

/// Name of the keeper's own state directory under the root.
pub const STATE_DIR: &str = ".release-keeper";

/// One configured site and the paths of its layout.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site's configuration.
    pub cfg: SiteConfig,
}

impl Site {
    /// Wraps a site configuration.
    pub fn new(cfg: SiteConfig) -> Site {
        Site { cfg }
    }

    /// The site's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// `ROOT`.
    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    /// `ROOT/deploy-cache`, where uploaders write.
    pub fn deploy_cache(&self) -> PathBuf {
        self.root().join("deploy-cache")
    }

    /// `ROOT/releases`.
    pub fn releases(&self) -> PathBuf {
        self.root().join("releases")
    }

    /// `ROOT/releases/<id>`.
    pub fn release(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }

    /// `ROOT/releases/.partial.<id>`, a release under construction.
    pub fn partial(&self, id: &str) -> PathBuf {
        self.releases()
            .join(format!("{}{id}", fsops::PARTIAL_PREFIX))
    }

    /// `ROOT/shared`.
    pub fn shared(&self) -> PathBuf {
        self.root().join("shared")
    }

    /// `ROOT/current`.
    pub fn current(&self) -> PathBuf {
        self.root().join("current")
    }

    /// `ROOT/.release-keeper`.
    pub fn state(&self) -> PathBuf {
        self.root().join(STATE_DIR)
    }

    /// The per-site operation lock, held only while working.
    pub fn op_lock(&self) -> PathBuf {
        self.state().join("lock")
    }

    /// The lifetime lock held by the one service serving this site.
    pub fn service_lock(&self) -> PathBuf {
        self.state().join("service.lock")
    }

    /// The append-only journal.
    pub fn journal(&self) -> PathBuf {
        self.state().join("journal")
    }

    /// Directory of stored per-release manifests.
    pub fn manifests(&self) -> PathBuf {
        self.state().join("manifests")
    }

    /// The stored manifest of release `id`.
    pub fn manifest_of(&self, id: &str) -> PathBuf {
        self.manifests().join(id)
    }

    /// Claimed markers waiting to be (or being) processed.
    pub fn claims(&self) -> PathBuf {
        self.state().join("claims")
    }

    /// Releases and leftovers on their way to deletion.
    pub fn trash(&self) -> PathBuf {
        self.state().join("trash")
    }

    /// Things healing moved aside instead of deleting (e.g. a real `current` directory).
    pub fn displaced(&self) -> PathBuf {
        self.state().join("displaced")
    }

    /// The hash cache of `deploy-cache/` files.
    pub fn hash_cache(&self) -> PathBuf {
        self.state().join("hashcache")
    }

    /// The ids of the pinned releases, kept beside the journal (`store::save_pins`).
    pub fn pins_file(&self) -> PathBuf {
        self.state().join("pins")
    }

    /// The process group of the hook running now (`hooks::reap_leftovers`).
    pub fn hook_record(&self) -> PathBuf {
        self.state().join("hook")
    }

    /// The spans of the keeper's own changes to release inodes (`release::changes`).
    pub fn changes_log(&self) -> PathBuf {
        self.state().join("changes")
    }

    /// The last verify result, shown by `status`.
    pub fn drift_file(&self) -> PathBuf {
        self.state().join("drift.json")
    }

    /// Directory of the last verify result of each release.
    pub fn drift_dir(&self) -> PathBuf {
        self.state().join("drift")
    }

    /// The last verify result of release `id`.
    pub fn drift_of(&self, id: &str) -> PathBuf {
        self.drift_dir().join(format!("{id}.json"))
    }

    /// The list of `shared` entries that are files (so healing never turns a missing
    /// `.env` into a directory).
    pub fn shared_files_list(&self) -> PathBuf {
        self.state().join("shared-files")
    }

    /// Remembers that shared entry `entry` is a file.
    pub fn record_shared_file(&self, entry: &Path) -> Result<()> {
        let list = self.shared_files_list();
        let mut text = std::fs::read_to_string(&list).unwrap_or_default();
        let line = hex_path(entry);
        if !text.lines().any(|l| l == line) {
            text.push_str(&line);
            text.push('\n');
            fsops::write_atomic(&list, text.as_bytes())?;
        }
        Ok(())
    }

    /// True when shared entry `entry` was created as a file.
    pub fn is_shared_file(&self, entry: &Path) -> bool {
        let line = hex_path(entry);
        std::fs::read_to_string(self.shared_files_list())
            .is_ok_and(|t| t.lines().any(|l| l == line))
    }

    /// The directories below the root whose entries healing recreates, each with the names
    /// in it that matter: `shared/` and every directory on the way to a nested shared entry
    /// or a nested link. Every one on the way, not only the entry's own: the directory
    /// above one moved away is the only one that hears of it. The root itself, watched
    /// for any change, is not among them.
    pub fn heal_watches(&self) -> BTreeMap<PathBuf, BTreeSet<OsString>> {
        let mut out: BTreeMap<PathBuf, BTreeSet<OsString>> = BTreeMap::new();
        let mut add = |mut dir: PathBuf, entry: &Path| {
            for part in entry.components() {
                out.entry(dir.clone())
                    .or_default()
                    .insert(part.as_os_str().to_os_string());
                dir.push(part);
            }
        };
        for entry in &self.cfg.shared {
            add(self.shared(), entry);
        }
        for link in self.cfg.links.keys() {
            add(self.root().to_path_buf(), link);
        }
        out.remove(self.root());
        out
    }

    /// The marker's path in `deploy-cache/`.
    pub fn marker(&self) -> PathBuf {
        self.deploy_cache().join(&self.cfg.marker)
    }

    /// The marker as uploaders know it, relative to the root (`deploy-cache/.release-ready`).
    pub fn marker_shown(&self) -> String {
        format!("deploy-cache/{}", self.cfg.marker)
    }

    /// The error for a release id this site does not have.
    pub fn no_release(&self, id: &str) -> Error {
        Error::Failed(format!("no release {id:?} in site {}", self.name()))
    }

    /// True when the root exists (a root that does not exist yet is waited for).
    pub fn root_exists(&self) -> bool {
        self.root().is_dir()
    }

    /// Creates the missing directories of the layout (not the root itself).
    pub fn ensure_layout(&self) -> Result<()> {
        fsops::ensure_dir(&self.deploy_cache(), 0o775)?;
        self.ensure_keeper_dirs()
    }

    /// Creates the missing directories of the layout but `deploy-cache/`, which while the
    /// service runs is the uploader's to replace (see `heal::Uploads`).
    pub fn ensure_keeper_dirs(&self) -> Result<()> {
        for (dir, mode) in self.keeper_dirs() {
            fsops::ensure_dir(&dir, mode)?;
        }
        Ok(())
    }

    /// The layout's directories but `deploy-cache/`, parents first, with the modes they
    /// are made with.
    pub fn keeper_dirs(&self) -> [(PathBuf, u32); 5] {
        [
            (self.releases(), 0o755),
            (self.shared(), 0o755),
            (self.state(), 0o750),
            (self.manifests(), 0o750),
            (self.claims(), 0o750),
        ]
    }

    /// Whether `releases/<id>` is a release on disk: a real directory. A symlink there (`ln
    /// -s /elsewhere releases/v1`) is none: switching `current` to it, or healing to it,
    /// would serve what it points at, outside the site.
    pub fn release_exists(&self, id: &str) -> bool {
        fsops::is_real_dir(&self.release(id))
    }

    /// The relative target `current` should have for release `id`.
    pub fn current_target_for(id: &str) -> PathBuf {
        Path::new("releases").join(id)
    }

    /// The release id `current` points at, if it is a symlink to `releases/<id>` that exists.
    pub fn current_id(&self) -> Option<String> {
        let target = std::fs::read_link(self.current()).ok()?;
        let id = release_id_of_target(&target, self.root())?;
        self.release_exists(&id).then_some(id)
    }
}

/// A path as hex, one line, whatever bytes it holds.
fn hex_path(p: &Path) -> String {
    fsops::path_bytes(p)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Extracts `<id>` from a `current` target `releases/<id>` (or its absolute equivalent, or
/// `./releases/<id>/` as a hand-made link may spell it). A target spelled any other way
/// (`releases/../releases/<id>`, an absolute path through another name of the root: a
/// symlinked `/srv`, a `pwd -P` path) is resolved as the kernel would; it names `<id>`
/// when it lands on an entry of `releases/`, so healing keeps an operator's manual switch
/// instead of taking it for a link outside `releases/`.
pub fn release_id_of_target(target: &Path, root: &Path) -> Option<String> {
    lexical_release_id(target, root).or_else(|| resolved_release_id(target, root))
}

fn lexical_release_id(target: &Path, root: &Path) -> Option<String> {
    let rel = if target.is_absolute() {
        target.strip_prefix(root).ok()?
    } else {
        target
    };
    let mut comps = rel
        .components()
        .skip_while(|c| matches!(c, std::path::Component::CurDir));
    let first = comps.next()?;
    let second = comps.next()?;
    if comps.next().is_some() || first.as_os_str() != "releases" {
        return None;
    }
    let id = second.as_os_str().to_str()?;
    crate::upload::marker::valid_id(id).then(|| id.to_string())
}

/// `<id>` when `target`, followed from `root` (symlinks and `..` resolved), is the
/// directory `releases/<id>` itself. A dangling target resolves to nothing: `None`.
fn resolved_release_id(target: &Path, root: &Path) -> Option<String> {
    let resolved = std::fs::canonicalize(root.join(target)).ok()?;
    let releases = std::fs::canonicalize(root.join("releases")).ok()?;
    if resolved.parent()? != releases {
        return None;
    }
    let id = resolved.file_name()?.to_str()?;
    crate::upload::marker::valid_id(id).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heal_watches_cover_every_directory_on_the_way_to_a_nested_entry() {
        let mut cfg = SiteConfig::with_defaults("shop", PathBuf::from("/srv/shop"));
        cfg.shared = ["storage", ".env", "cache/views", "a/b/c"]
            .map(PathBuf::from)
            .to_vec();
        cfg.links = BTreeMap::from([
            (PathBuf::from("htdocs"), PathBuf::from("current/public")),
            (PathBuf::from("web/docs"), PathBuf::from("../current/docs")),
        ]);
        let got: Vec<(String, Vec<String>)> = Site::new(cfg)
            .heal_watches()
            .into_iter()
            .map(|(dir, names)| {
                let names = names.iter().map(|n| n.to_string_lossy().into()).collect();
                (dir.display().to_string(), names)
            })
            .collect();
        let want = [
            ("/srv/shop/shared", vec![".env", "a", "cache", "storage"]),
            ("/srv/shop/shared/a", vec!["b"]),
            ("/srv/shop/shared/a/b", vec!["c"]),
            ("/srv/shop/shared/cache", vec!["views"]),
            ("/srv/shop/web", vec!["docs"]),
        ]
        .map(|(d, n)| (d.to_string(), n.into_iter().map(String::from).collect()));
        assert_eq!(
            got, want,
            "the root is watched whole; top-level links need nothing more"
        );
    }
}
