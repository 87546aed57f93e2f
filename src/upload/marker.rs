//! The marker (`deploy-cache/.release-ready`) and its claims.
//!
//! Claiming is one `rename(2)` of the marker into `.release-keeper/claims/`, so a marker
//! dropped again while the keeper works is a new file and is not lost. A claim stays on
//! disk until its release is finalized and activated (or the upload is rejected), so a
//! crash or SIGTERM mid-way means the claim is redone at the next start.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::site::Site;

/// Largest marker the keeper reads.
pub const MAX_MARKER_BYTES: u64 = 64 * 1024;
/// Longest release id.
pub const MAX_ID_LEN: usize = 128;

/// What an upload asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerSpec {
    /// Explicit release id.
    pub id: Option<String>,
    /// Switch `current` to the release (default true).
    pub activate: bool,
    /// Free text, logged.
    pub message: Option<String>,
}

impl Default for MarkerSpec {
    fn default() -> Self {
        MarkerSpec {
            id: None,
            activate: true,
            message: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkerToml {
    id: Option<String>,
    activate: Option<bool>,
    message: Option<String>,
}

/// True for ids matching `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Checks an id, with a reason naming it when invalid.
pub fn check_id(id: &str) -> Result<(), String> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "invalid release id {id:?}: expected [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        ))
    }
}

/// Where a TOML error is, as " at line L, column C: `<that line>`", so an uploader sees
/// which key was wrong without the keeper's source at hand.
fn toml_location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let (line, column) = crate::config::line_col(text, span.start);
    let shown = text
        .split('\n')
        .nth(line - 1)
        .unwrap_or("")
        .trim_end_matches('\r');
    format!(" at line {line}, column {column}: `{shown}`")
}

/// Parses a marker: empty, TOML with `id`/`activate`/`message`, or one bare id line.
pub fn parse(bytes: &[u8]) -> Result<MarkerSpec, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "marker is not UTF-8".to_string())?;
    // Windows editors start UTF-8 files with a byte-order mark; it is not part of an id.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Ok(MarkerSpec::default());
    }
    let spec = match toml::from_str::<MarkerToml>(text) {
        Ok(t) => MarkerSpec {
            id: t.id,
            activate: t.activate.unwrap_or(true),
            message: t.message,
        },
        Err(toml_err) => {
            let line = text.trim();
            if line.lines().count() == 1 && !line.contains(['=', '[', '"']) {
                MarkerSpec {
                    id: Some(line.to_string()),
                    ..MarkerSpec::default()
                }
            } else {
                return Err(format!(
                    "marker is neither a bare id nor valid TOML: {}{}",
                    toml_err.message().trim().replace('\n', "; "),
                    toml_location(text, toml_err.span())
                ));
            }
        }
    };
    if let Some(id) = &spec.id {
        check_id(id)?;
    }
    Ok(spec)
}

/// A claimed marker, resolved to a release id, persisted in `claims/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The release id (explicit or generated).
    pub id: String,
    /// Whether the id came from the upload.
    pub explicit: bool,
    /// Switch `current` once finalized.
    pub activate: bool,
    /// The marker's message.
    pub message: Option<String>,
    /// Set once the release is finalized and journaled: a redo goes straight to activation.
    #[serde(default)]
    pub finalized: bool,
}

/// A claim file and its state.
#[derive(Debug, Clone)]
pub enum Pending {
    /// A raw marker just moved out of `deploy-cache/`, not yet parsed.
    Raw(PathBuf),
    /// A resolved claim.
    Resolved(PathBuf, Claim),
}

const RAW_EXT: &str = "marker";
/// First byte of a raw claim that records why the marker itself was unreadable (a NUL
/// can never start a valid marker, which must be UTF-8 text).
const REJECTED_TAG: u8 = 0;
const CLAIM_EXT: &str = "claim";

/// A claim name that sorts in arrival order.
fn claim_stem() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:024}-{}", std::process::id())
}

/// How long a marker found by a scan (not announced by its close-write or rename event)
/// must have been left alone before it is claimed: `echo id > .release-ready` and sftp
/// create the file before writing it, and an empty marker would mean "no id".
pub const MARKER_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// True when the marker in `deploy-cache/` (open as `dir`) exists but changed less than
/// `min_age` ago.
fn marker_is_young(dir: &std::os::fd::OwnedFd, site: &Site, min_age: std::time::Duration) -> bool {
    if min_age.is_zero() {
        return false;
    }
    let Ok(st) = nix::sys::stat::fstatat(
        dir,
        site.cfg.marker.as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) else {
        return false;
    };
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            st.st_ctime.max(0) as u64,
            st.st_ctime_nsec.clamp(0, 999_999_999) as u32,
        );
    std::time::SystemTime::now()
        .duration_since(changed)
        .map_or(true, |age| age < min_age)
}

/// Whether some process holds the file `name` of the open directory `dir` open for
/// writing: a read lease (`F_SETLEASE`) is refused with EAGAIN exactly then. `Ok(None)`
/// when it cannot be told (not a regular file, not the owner and no CAP_LEASE, a
/// filesystem without leases); `Err` when the file cannot be opened (`NotFound`: there is
/// no marker).
fn open_for_writing(dir: &std::os::fd::OwnedFd, name: &str) -> std::io::Result<Option<bool>> {
    use std::os::fd::AsRawFd;
    let f = fsops::open_nofollow_at(dir, std::ffi::OsStr::new(name))?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(None);
    }
    // SAFETY: plain fcntl on a descriptor we own for the duration of the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above; drops the lease at once so no writer is ever delayed.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Ok(Some(false));
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Ok(Some(true)),
        _ => Ok(None),
    }
}

/// Moves the marker out of `deploy-cache/` into the claims directory, unless someone
/// still has it open for writing (its close-write event will come), or, where that
/// cannot be told, it changed less than `min_age` ago. Returns the raw claim it made, or
/// `None` when nothing was claimed.
///
/// `deploy-cache/` is opened once, without following a symlink, and the marker is looked
/// at and moved relative to that: an uploader who replaced `deploy-cache/` with a link
/// (to another site's, say) gets an error naming it, and nothing outside the root is read
/// or moved, even if the swap comes in the middle.
pub fn claim_marker(site: &Site, min_age: std::time::Duration) -> Result<Option<PathBuf>> {
    let dir = match fsops::open_dir_nofollow(&site.deploy_cache()) {
        Ok(d) => d,
        // Removed by the uploader (`rm -rf deploy-cache && mkdir deploy-cache`).
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let name = site.cfg.marker.as_str();
    match open_for_writing(&dir, name) {
        // No marker (every idle pass): one failed open, nothing more. One dropped right
        // after this wakes the worker by its own event.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Ok(Some(true)) => return Ok(None),
        Ok(Some(false)) => {}
        _ if marker_is_young(&dir, site, min_age) => return Ok(None),
        _ => {}
    }
    let marker = site.marker();
    let mut dest = site.claims().join(format!("{}.{RAW_EXT}", claim_stem()));
    let moved =
        nix::fcntl::renameat(&dir, name, nix::fcntl::AT_FDCWD, &dest).map_err(std::io::Error::from);
    match moved {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // deploy-cache/ on another filesystem (an sftp chroot bind mount): first a
            // rename inside deploy-cache/ (so a marker dropped again meanwhile is a new
            // file), then copy the content over and remove the renamed one.
            // A crash between the two steps leaves the hidden marker behind:
            // `finish_hidden_claims` turns it into its claim at the next healing pass.
            let stem = claim_stem();
            let hidden = site
                .deploy_cache()
                .join(format!("{}{stem}", fsops::TMP_PREFIX));
            let hidden_name = format!("{}{stem}", fsops::TMP_PREFIX);
            nix::fcntl::renameat(&dir, name, &dir, hidden_name.as_str())
                .map_err(std::io::Error::from)
                .at(&marker)?;
            nix::unistd::fsync(&dir)
                .map_err(std::io::Error::from)
                .at(&site.deploy_cache())?;
            dest = claim_hidden(site, &hidden, &stem)?;
        }
        Err(e) => {
            // The marker is a plain name in the open `deploy-cache/`, so a path that is no
            // directory can only be on the claims side (`.release-keeper/claims` made a
            // file): named there, the error points at what to fix, not at a good marker.
            let claims = site.claims();
            let at = if e.raw_os_error() == Some(libc::ENOTDIR) || !fsops::is_real_dir(&claims) {
                claims
            } else {
                marker
            };
            return Err(e).at(&at);
        }
    }
    nix::unistd::fsync(&dir)
        .map_err(std::io::Error::from)
        .at(&site.deploy_cache())?;
    fsops::fsync_dir(&site.claims())?;
    Ok(Some(dest))
}

/// Turns the marker renamed to `hidden` (in `deploy-cache/`) into the claim named `stem`,
/// then removes it: the second half of a claim across filesystems. Returns the claim.
fn claim_hidden(site: &Site, hidden: &Path, stem: &str) -> Result<PathBuf> {
    let bytes = match fsops::read_small_nofollow(hidden, MAX_MARKER_BYTES) {
        Ok(b) => b,
        Err(Error::Rejected(r)) => [&[REJECTED_TAG][..], r.as_bytes()].concat(),
        Err(e) => return Err(e),
    };
    let dest = site.claims().join(format!("{stem}.{RAW_EXT}"));
    fsops::write_atomic(&dest, &bytes)?;
    fsops::remove_tree(hidden)?;
    Ok(dest)
}

/// The claim stem of a name in `deploy-cache/` that is a marker hidden by a claim across
/// filesystems (`.rk-tmp.<24 digits>-<pid>`), if it is one.
pub fn hidden_claim_stem(name: &str) -> Option<&str> {
    let stem = name.strip_prefix(fsops::TMP_PREFIX)?;
    let (nanos, pid) = stem.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (nanos.len() == 24 && digits(nanos) && digits(pid)).then_some(stem)
}

/// Finishes the claims across filesystems that a crash (or an error between the two
/// steps) left as hidden markers in `deploy-cache/` (found among `paths`, the keeper's
/// temporary names there): each becomes its claim, in its original arrival order, so the
/// upload is processed instead of lost, and the hidden file does not end up in the next
/// release as an unlisted file. The caller holds the operation lock, which every claim is
/// made under, so none of them is still in progress. Returns the hidden markers it
/// finished (or, with `dry_run`, would finish).
pub fn finish_hidden_claims(site: &Site, paths: &[PathBuf], dry_run: bool) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    for hidden in paths {
        let Some(stem) = hidden
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(hidden_claim_stem)
        else {
            continue;
        };
        // Only ever a regular file; anything else under the reserved name is left alone.
        if !fs::symlink_metadata(hidden).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if !dry_run {
            if let Err(e) = claim_hidden(site, hidden, stem) {
                // Kept for the next pass; the rest of the pass goes on.
                tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(),
                    path = %hidden.display(), reason = %e, "cannot finish an interrupted claim yet");
                continue;
            }
        }
        done.push(hidden.clone());
    }
    if !dry_run && !done.is_empty() {
        fsops::fsync_dir(&site.deploy_cache())?;
        fsops::fsync_dir(&site.claims())?;
    }
    Ok(done)
}

/// The marker text that asks for `spec`.
fn marker_text(spec: &MarkerSpec) -> String {
    let mut text = String::new();
    if let Some(id) = &spec.id {
        text.push_str(&format!("id = {}\n", toml_str(id)));
    }
    text.push_str(&format!("activate = {}\n", spec.activate));
    if let Some(message) = &spec.message {
        text.push_str(&format!("message = {}\n", toml_str(message)));
    }
    text
}

/// Writes the claim for a `finalize` command. An upload already announced is that
/// request: a marker waiting in `deploy-cache/` (the service stopped, or the command run
/// first), or a claim the service took and has not processed yet (it may be waiting,
/// without the lock, for files still in flight). The newest such is taken, with the
/// command's `--id` and `--no-activate` laid over its keys, so the upload becomes one
/// release rather than one for the command and an identical second one for the marker.
/// Without one, the claim is `spec`, as if that marker had been dropped. A marker that
/// cannot be read (a bad id, `activate = "no"`, a symlink) is the request too: it is
/// left to be rejected as the service would, and no claim of the command's own is made,
/// since going ahead would deploy the upload against what its marker asked (activate
/// what it wanted staged, under another id). The caller holds the operation lock, so the
/// service cannot claim or process anything in between.
pub fn claim_for_finalize(site: &Site, spec: &MarkerSpec) -> Result<()> {
    claim_marker(site, std::time::Duration::ZERO)?;
    match pending(site)?.pop() {
        Some(Pending::Raw(raw)) => match read_raw(&raw, &site.marker_shown()) {
            Ok(marker) => {
                let merged = MarkerSpec {
                    id: spec.id.clone().or(marker.id),
                    activate: spec.activate && marker.activate,
                    message: marker.message.or_else(|| spec.message.clone()),
                };
                // Rewritten in place: the claim keeps its place in arrival order.
                fsops::write_atomic(&raw, marker_text(&merged).as_bytes())
            }
            Err(Error::Rejected(_)) => Ok(()),
            Err(e) => Err(e),
        },
        // A finalized claim is a release built and only waiting to be activated: the
        // upload behind it was consumed, so the command's request is a new one.
        Some(Pending::Resolved(path, mut claim)) if !claim.finalized => {
            if let Some(id) = &spec.id {
                claim.id = id.clone();
                claim.explicit = true;
            }
            claim.activate &= spec.activate;
            if claim.message.is_none() {
                claim.message = spec.message.clone();
            }
            save(&path, &claim)
        }
        _ => {
            let dest = site.claims().join(format!("{}.{RAW_EXT}", claim_stem()));
            fsops::write_atomic(&dest, marker_text(spec).as_bytes())
        }
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Claims waiting in arrival order. A raw marker whose resolved claim also exists (crash
/// between the two writes) is dropped in favour of the claim.
pub fn pending(site: &Site) -> Result<Vec<Pending>> {
    let dir = site.claims();
    let mut names: Vec<PathBuf> = match fs::read_dir(&dir) {
        // A resolved claim is a file the keeper wrote: anything else under that name is
        // not one (healing moves it aside). A claimed marker may be anything the uploader
        // made (a directory, a fifo), and is rejected as such.
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| !is_bogus_claim(&e.file_name(), e.file_type().ok()))
            .map(|e| e.path())
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at(&dir),
    };
    names.sort();
    let mut out = Vec::new();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some(RAW_EXT) => {
                if p.with_extension(CLAIM_EXT).exists() {
                    let _ = fs::remove_file(&p);
                } else {
                    out.push(Pending::Raw(p));
                }
            }
            Some(CLAIM_EXT) => {
                let bytes = fs::read(&p).at(&p)?;
                match serde_json::from_slice::<Claim>(&bytes) {
                    Ok(c) => out.push(Pending::Resolved(p, c)),
                    Err(e) => {
                        tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), path = %p.display(), reason = %e,
                            "removing unreadable claim");
                        let _ = fs::remove_file(&p);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// True for an entry of the claims directory named like a resolved claim that is not a
/// regular file (a hand edit): reading it fails, or hangs on a fifo.
pub fn is_bogus_claim(name: &std::ffi::OsStr, kind: Option<fs::FileType>) -> bool {
    Path::new(name).extension().and_then(|e| e.to_str()) == Some(CLAIM_EXT)
        && !kind.is_some_and(|k| k.is_file())
}

/// Reads a raw claimed marker; `shown` is the marker as the uploader named it
/// (`deploy-cache/.release-ready`), for the rejection reasons.
pub fn read_raw(path: &Path, shown: &str) -> Result<MarkerSpec> {
    let bytes = fsops::read_small_nofollow(path, MAX_MARKER_BYTES).map_err(|e| match e {
        Error::Rejected(r) => Error::Rejected(format!("the marker {shown} {r}")),
        // The uploader's mode for it (a umask of 077), not a fault of the keeper: kept as
        // an error, the claim would stay first in line and hold up every later upload.
        Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
        {
            Error::Rejected(format!(
                "the marker {shown} cannot be read by the keeper ({source}); make it \
                 readable by the keeper's user and drop it again"
            ))
        }
        other => other,
    })?;
    if let Some(reason) = bytes.strip_prefix(&[REJECTED_TAG]) {
        return Err(Error::Rejected(format!(
            "the marker {shown} {}",
            String::from_utf8_lossy(reason)
        )));
    }
    parse(&bytes).map_err(Error::Rejected)
}

/// Persists the resolved claim beside the raw marker, then removes the raw marker.
pub fn resolve(raw: &Path, claim: &Claim) -> Result<PathBuf> {
    let path = raw.with_extension(CLAIM_EXT);
    save(&path, claim)?;
    delete(raw)?;
    Ok(path)
}

/// Rewrites a claim file.
pub fn save(path: &Path, claim: &Claim) -> Result<()> {
    let bytes = serde_json::to_vec(claim)
        .map_err(|e| Error::Failed(format!("cannot encode claim: {e}")))?;
    fsops::write_atomic(path, &bytes)
}

/// Removes a claim (or raw marker) once its upload is done with; a directory an uploader
/// dropped as the marker is moved aside.
pub fn remove(site: &Site, path: &Path) -> Result<()> {
    // A directory dropped under the marker's name (`mv build/.release-ready ...` of the
    // wrong thing) is rejected as no marker, but what it holds is someone's: moved aside
    // into `.release-keeper/displaced/`, never deleted with its contents.
    if fsops::is_real_dir(path) {
        let aside = crate::heal::displace(site, path, &site.cfg.marker)?;
        tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(),
            path = %aside.display(), reason = "the marker was a directory; kept here",
            "marker directory moved aside");
        return Ok(());
    }
    delete(path)
}

/// Deletes a claim file, durably.
fn delete(path: &Path) -> Result<()> {
    fsops::remove_tree(path)?;
    if let Some(dir) = path.parent() {
        fsops::fsync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in [
            "v1",
            "2026.11.22-1",
            "A_b-c.d",
            "9",
            "a.",
            "a-",
            "a_",
            &"a".repeat(128),
        ] {
            assert!(valid_id(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "-a",
            "_a",
            ".hidden",
            "a/b",
            "a b",
            &"a".repeat(129),
            "é",
        ] {
            assert!(!valid_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_marker() {
        let bom = "\u{feff}";
        assert_eq!(
            parse(format!("{bom}v7\r\n").as_bytes()).map(|m| m.id),
            Ok(Some("v7".to_string())),
            "bare id"
        );
        assert_eq!(
            parse(format!("{bom}id = \"v8\"\n").as_bytes()).map(|m| m.id),
            Ok(Some("v8".to_string())),
            "TOML"
        );
        assert_eq!(parse(bom.as_bytes()), Ok(MarkerSpec::default()), "empty");
    }

    #[test]
    fn marker_toml_error_names_the_line_and_key() {
        let e = parse(b"id = \"v1\"\nactivate = \"no\"\n").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("activate = \"no\""),
            "the error must point at the activate line: {e}"
        );
        let e = parse(b"id = \"v1\"\nactiv = true\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("activ"), "{e}");
    }

    #[test]
    fn marker_forms() {
        assert_eq!(parse(b"").unwrap(), MarkerSpec::default());
        assert_eq!(parse(b"\n  \n").unwrap(), MarkerSpec::default());
        assert_eq!(parse(b"v42\n").unwrap().id.as_deref(), Some("v42"));
        let s = parse(b"id = \"v1\"\nactivate = false\nmessage = \"hi\"\n").unwrap();
        assert_eq!(
            s,
            MarkerSpec {
                id: Some("v1".into()),
                activate: false,
                message: Some("hi".into())
            }
        );
        assert!(parse(b"id = \"../x\"")
            .unwrap_err()
            .contains("invalid release id"));
        assert!(parse(b"../x").unwrap_err().contains("invalid release id"));
        assert!(parse(b"idd = \"v1\"").is_err());
        assert!(parse(b"\xff\xfe").is_err());
        assert!(parse(b"two\nlines").is_err());
    }

    #[test]
    fn hidden_claim_stems_are_recognised_by_their_exact_shape() {
        let ok = ".rk-tmp.000001796277318447591246-5914";
        assert_eq!(hidden_claim_stem(ok), Some("000001796277318447591246-5914"));
        for not in [
            ".rk-tmp.000001796277318447591246",
            ".rk-tmp.00000179627731844759124-5914",
            ".rk-tmp.000001796277318447591246-",
            ".rk-tmp.000001796277318447591246-59x4",
            ".rk-tmp.htdocs.5914.0",
            "rk-tmp.000001796277318447591246-5914",
            ".release-ready",
        ] {
            assert_eq!(hidden_claim_stem(not), None, "{not}");
        }
    }
}
