//! `upload::manifest::parse` on arbitrary bytes. Beyond "never panics", every accepted
//! manifest must only hold paths that are safe to join onto a release directory, and
//! must survive a round trip through `format_line` (what `sha256sum` would print).
#![no_main]

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use release_keeper::upload::manifest::{format_line, parse, MAX_MANIFEST_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse(data) else {
        return;
    };
    assert!(data.len() as u64 <= MAX_MANIFEST_BYTES);
    let mut again = Vec::new();
    for (path, digest) in &entries {
        check_safe(path);
        again.extend(format_line(path, digest));
    }
    let reparsed = parse(&again).expect("a formatted manifest must parse");
    assert_eq!(reparsed, entries, "format_line/parse round trip");
});

/// A path the keeper may join onto `releases/.partial.<id>`: relative, non-empty, only
/// normal components, no NUL, no trailing slash, not `.`/`..` anywhere.
fn check_safe(path: &Path) {
    let bytes = path.as_os_str().as_bytes();
    assert!(!bytes.is_empty(), "empty path accepted");
    assert!(!bytes.contains(&0), "NUL accepted: {path:?}");
    assert!(!bytes.starts_with(b"/"), "absolute path accepted: {path:?}");
    assert!(!bytes.ends_with(b"/"), "trailing slash accepted: {path:?}");
    for comp in bytes.split(|&b| b == b'/') {
        assert!(
            !comp.is_empty() && comp != b"." && comp != b"..",
            "unsafe component in {path:?}"
        );
    }
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "non-normal component in {path:?}"
    );
    // Joined onto a directory it stays below it.
    let base = Path::new("/release");
    assert!(base.join(path).starts_with(base));
}
