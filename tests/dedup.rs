//! Unchanged files are hard links to the previous release's identical file (decided by
//! hash), both for a persistent mirror (hash cache hit: not even read) and for a fresh
//! upload into an emptied deploy-cache (hashed once while copying, then linked); never
//! linked to deploy-cache/ itself.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;

fn ino(p: &std::path::Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

fn linked_count(svc: &Service, id: &str) -> u64 {
    svc.wait_release_event("release.finalized", id)["linked"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn unchanged_files_share_inodes_with_the_previous_release() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let v1: Vec<(&str, &[u8])> = vec![
        ("a.txt", b"alpha v1"),
        ("lib/b.js", b"bravo"),
        ("lib/c.css", b"charlie"),
    ];
    site.deploy(&v1, "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    assert_eq!(linked_count(&svc, "v1"), 0);

    // Persistent mirror: only a.txt is rewritten (new inode, as rsync does).
    let dc = site.deploy_cache();
    fs::remove_file(dc.join("a.txt")).unwrap();
    fs::write(dc.join("a.txt"), b"alpha v2").unwrap();
    write_sha256sums(&dc);
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(linked_count(&svc, "v2"), 2, "b.js and c.css linked from v1");
    for f in ["lib/b.js", "lib/c.css"] {
        assert_eq!(
            ino(&site.release("v1").join(f)),
            ino(&site.release("v2").join(f)),
            "{f}"
        );
        assert_ne!(
            ino(&dc.join(f)),
            ino(&site.release("v2").join(f)),
            "{f} shared with deploy-cache"
        );
    }
    assert_ne!(
        ino(&site.release("v1").join("a.txt")),
        ino(&site.release("v2").join("a.txt"))
    );
    assert_eq!(
        fs::read(site.release("v2").join("a.txt")).unwrap(),
        b"alpha v2"
    );

    // Fresh upload into an emptied deploy-cache: every inode is new, content of c.css unchanged.
    let v3: Vec<(&str, &[u8])> = vec![
        ("a.txt", b"alpha v3"),
        ("lib/b.js", b"bravo v3"),
        ("lib/c.css", b"charlie"),
    ];
    site.deploy(&v3, "id = \"v3\"\n");
    svc.wait_release_event("release.activated", "v3");
    assert_eq!(
        linked_count(&svc, "v3"),
        1,
        "c.css linked by hash after the copy"
    );
    assert_eq!(
        ino(&site.release("v2").join("lib/c.css")),
        ino(&site.release("v3").join("lib/c.css"))
    );
    assert_eq!(
        fs::read(site.release("v3").join("lib/b.js")).unwrap(),
        b"bravo v3"
    );

    // An uploader writing in place afterwards cannot alter any release.
    fs::write(dc.join("lib/c.css"), b"tampered").unwrap();
    for id in ["v1", "v2", "v3"] {
        assert_eq!(
            fs::read(site.release(id).join("lib/c.css")).unwrap(),
            b"charlie",
            "{id}"
        );
    }
    assert!(
        site.hidden_release_entries().is_empty(),
        "no temporary names left: {:?}",
        site.releases_entries()
    );
    svc.stop();
}
