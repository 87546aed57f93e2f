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
}
