//! Files that still look in flight: uploaders write under temporary names and rename at
//! the end, so while such a name exists the upload is not complete yet.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// rsync `--delay-updates` holds every updated file in this directory beside its final
/// place and renames them all into place at the end: while it exists rsync is at work.
pub const RSYNC_DELAY_DIR: &[u8] = b".~tmp~";

/// True for rsync temp names (`.<name>.XXXXXX`), rsync's `--delay-updates` holding
/// directory (`.~tmp~`), `*.filepart` (WinSCP) and `*.part`. A directory (`is_dir`) is in
/// flight only as `.~tmp~`: uploaders write files under temporary names, never
/// directories, and a directory is never listed in a manifest, so an `assets.part/` or
/// `.cache.abcdef/` of the build would otherwise hold every upload up to
/// `upload_timeout` and get it rejected.
pub fn looks_in_flight(name: &OsStr, is_dir: bool) -> bool {
    let b = name.as_bytes();
    if b == RSYNC_DELAY_DIR {
        return true;
    }
    if is_dir {
        return false;
    }
    if b.ends_with(b".filepart") || b.ends_with(b".part") {
        return true;
    }
    // rsync: '.' + original name + '.' + 6 random [A-Za-z0-9]
    if b.len() >= 9 && b[0] == b'.' && b[b.len() - 7] == b'.' {
        return b[b.len() - 6..].iter().all(u8::is_ascii_alphanumeric);
    }
    false
}

/// True when `name`, at the top of an upload, may be the manifest `manifest` itself still
/// arriving: rsync's `.<manifest>.XXXXXX`, `<manifest>.part` or `.filepart`, or rsync
/// `--delay-updates`'s holding directory, where it waits for its rename. Other names that
/// look in flight (a build's own `.env.sample`) say nothing about the manifest: waiting on
/// them for a manifest that is simply missing would hold the upload to `upload_timeout`
/// and then blame the wrong file.
pub fn may_be_manifest(name: &OsStr, is_dir: bool, manifest: &OsStr) -> bool {
    let (b, m) = (name.as_bytes(), manifest.as_bytes());
    if is_dir {
        return b == RSYNC_DELAY_DIR;
    }
    if let Some(rest) = b.strip_prefix(m) {
        return rest == b".part" || rest == b".filepart";
    }
    b.strip_prefix(b".")
        .and_then(|r| r.strip_prefix(m))
        .and_then(|r| r.strip_prefix(b"."))
        .is_some_and(|r| r.len() == 6 && r.iter().all(u8::is_ascii_alphanumeric))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for yes in [
            ".index.html.Ab3xY9",
            ".a.zzzzzz",
            "big.iso.filepart",
            "x.part",
            ".~tmp~",
        ] {
            assert!(looks_in_flight(OsStr::new(yes), false), "{yes}");
        }
        for no in [
            "index.html",
            ".env",
            ".htaccess",
            "a.Ab3xY9",
            ".partial",
            "part",
            ".a.b",
            "~tmp~",
            ".~tmp~x",
        ] {
            assert!(!looks_in_flight(OsStr::new(no), false), "{no}");
        }
    }

    #[test]
    fn directories_are_in_flight_only_as_rsyncs_holding_directory() {
        assert!(looks_in_flight(OsStr::new(".~tmp~"), true));
        for no in ["assets.part", ".cache.abcdef", "x.filepart"] {
            assert!(!looks_in_flight(OsStr::new(no), true), "{no}");
            assert!(looks_in_flight(OsStr::new(no), false), "{no}");
        }
    }

    #[test]
    fn only_the_manifests_own_temporary_names_may_be_the_manifest() {
        let m = OsStr::new("SHA256SUMS");
        for yes in [
            ".SHA256SUMS.Xy12Ab",
            "SHA256SUMS.part",
            "SHA256SUMS.filepart",
        ] {
            assert!(may_be_manifest(OsStr::new(yes), false, m), "{yes}");
        }
        assert!(may_be_manifest(OsStr::new(".~tmp~"), true, m));
        for no in [
            ".env.sample",
            ".index.html.Ab3xY9",
            "x.part",
            ".SHA256SUMS.Xy12A",
            ".SHA256SUMS.Xy12Ab7",
            ".SHA256SUMS.Xy-2Ab",
            "SHA256SUMS",
        ] {
            assert!(!may_be_manifest(OsStr::new(no), false, m), "{no}");
        }
        assert!(!may_be_manifest(OsStr::new("SHA256SUMS.part"), true, m));
    }
}
