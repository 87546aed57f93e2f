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

/// Files the release had to read and hash (the others came from the hash cache).
fn hashed_count(svc: &Service, id: &str) -> u64 {
    svc.wait_release_event("release.finalized", id)["hashed"]
        .as_u64()
        .unwrap_or(u64::MAX)
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
    assert_eq!(
        hashed_count(&svc, "v2"),
        2,
        "only a.txt and the new SHA256SUMS read: b.js and c.css came from the hash cache"
    );
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
    assert_eq!(hashed_count(&svc, "v3"), 4, "a fresh upload is read once");
    assert_eq!(
        ino(&site.release("v2").join("lib/c.css")),
        ino(&site.release("v3").join("lib/c.css"))
    );
    assert_eq!(
        fs::read(site.release("v3").join("lib/b.js")).unwrap(),
        b"bravo v3"
    );

    // A fresh upload that moved a file: linked by its digest from wherever it was.
    let v4: Vec<(&str, &[u8])> = vec![
        ("a.txt", b"alpha v3"),
        ("lib/b.js", b"bravo v3"),
        ("css/moved.css", b"charlie"),
    ];
    site.deploy(&v4, "id = \"v4\"\n");
    svc.wait_release_event("release.activated", "v4");
    assert_eq!(linked_count(&svc, "v4"), 3, "all three contents were in v3");
    assert_eq!(
        ino(&site.release("v3").join("lib/c.css")),
        ino(&site.release("v4").join("css/moved.css")),
        "the moved file shares v3's inode"
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

/// The hash cache only saves reads: garbage in it, a digest in it that lies, or no cache at
/// all must each cost reads of the files concerned, never a wrong or rejected release.
#[test]
fn a_corrupt_lying_or_missing_hash_cache_only_costs_reads() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let files: Vec<(&str, &[u8])> = vec![
        ("a.txt", b"alpha"),
        ("lib/b.js", b"bravo"),
        ("lib/c.css", b"charlie"),
    ];
    site.deploy(&files, "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let cache = site.root.join(".release-keeper/hashcache");
    assert!(
        cache.exists(),
        "the build must leave a hash cache at {cache:?}"
    );

    // Garbage: not one line parses. Every file is read again, and linked by digest.
    fs::write(&cache, b"\x00\xff garbage\n1 2 3\nnot a cache line at all").unwrap();
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(
        hashed_count(&svc, "v2"),
        4,
        "garbage cache: all four files read"
    );
    assert_eq!(
        linked_count(&svc, "v2"),
        4,
        "unchanged content still linked by digest"
    );

    // A line that keeps b.js's stat key but lies about its digest: the manifest disagrees,
    // so the file is read, and the release holds the true content.
    let text = fs::read(&cache).unwrap();
    let mut lied = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.ends_with(b" lib/b.js\n") {
            let fields: Vec<&[u8]> = line.splitn(7, |&b| b == b' ').collect();
            assert_eq!(fields.len(), 7, "unexpected cache line {line:?}");
            for f in &fields[..5] {
                lied.extend_from_slice(f);
                lied.push(b' ');
            }
            lied.extend_from_slice(&[b'0'; 64]);
            lied.push(b' ');
            lied.extend_from_slice(fields[6]);
        } else {
            lied.extend_from_slice(line);
        }
    }
    assert_ne!(lied, text, "b.js must be in the cache");
    fs::write(&cache, &lied).unwrap();
    site.drop_marker("id = \"v3\"\n");
    svc.wait_release_event("release.activated", "v3");
    assert_eq!(
        hashed_count(&svc, "v3"),
        1,
        "only the file the cache lied about is read"
    );
    assert_eq!(
        fs::read(site.release("v3").join("lib/b.js")).unwrap(),
        b"bravo"
    );

    // No cache at all (deleted by hand, or lost in a crash).
    fs::remove_file(&cache).unwrap();
    site.drop_marker("id = \"v4\"\n");
    svc.wait_release_event("release.activated", "v4");
    assert_eq!(
        hashed_count(&svc, "v4"),
        4,
        "missing cache: all four files read"
    );
    for id in ["v2", "v3", "v4"] {
        assert_eq!(
            fs::read(site.release(id).join("lib/b.js")).unwrap(),
            b"bravo",
            "{id}"
        );
    }
    svc.stop();
}

/// Paths of a line file whose path is the last space-separated field (escapes kept: the
/// names used here have none).
fn paths_of(file: &std::path::Path, field: usize) -> Vec<Vec<u8>> {
    fs::read(file)
        .unwrap()
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.splitn(field + 1, |&b| b == b' ')
                .nth(field)
                .unwrap()
                .to_vec()
        })
        .collect()
}

/// The stored manifest and the hash cache are written in walk order (what lets the next
/// build read them beside its walk, never whole in memory), however the workers finish:
/// many directories and more files than one worker batch, with names whose byte order
/// differs from path order ("a" < "a-b" < "a.txt" but "a/..." comes right after "a").
#[test]
fn manifest_and_hash_cache_are_in_walk_order() {
    use release_keeper::release::ordered::cmp_paths;
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for d in ["a", "a-b", "a.txt.d", "b/c", "b/c/d"] {
        for i in 0..150 {
            files.push((format!("{d}/f{i:03}"), format!("{d} {i}").into_bytes()));
        }
    }
    files.push(("a.txt".into(), b"top".to_vec()));
    files.push(("b.txt".into(), b"top".to_vec()));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    site.deploy(&refs, "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");

    let state = site.root.join(".release-keeper");
    let manifest = paths_of(&state.join("manifests/v1"), 4);
    let cache = paths_of(&state.join("hashcache"), 6);
    // Every file, once (the cache also records SHA256SUMS).
    assert_eq!(cache.len(), files.len() + 1);
    for (name, list) in [("manifest", &manifest), ("hash cache", &cache)] {
        for w in list.windows(2) {
            assert_eq!(
                cmp_paths(&w[0], &w[1]),
                std::cmp::Ordering::Less,
                "{name} out of walk order: {:?} before {:?}",
                String::from_utf8_lossy(&w[0]),
                String::from_utf8_lossy(&w[1])
            );
        }
    }
    svc.stop();
}

/// An uploader that seeds `deploy-cache/` with hard links to the live release (`cp -al`,
/// `rsync --link-dest=../current`) hands the keeper an earlier release's own inode: the
/// new release must still get a copy, never that inode, or the uploader writing in place
/// would alter it.
#[test]
fn an_upload_hard_linked_to_a_release_does_not_share_its_inode_with_the_new_release() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    site.stage_upload(&[("a.txt", b"alpha"), ("lib/b.js", b"bravo")]);
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v1"]),
        "finalize v1",
    );

    let dc = site.deploy_cache();
    clear_dir(&dc);
    fs::create_dir(dc.join("lib")).unwrap();
    for f in ["a.txt", "lib/b.js"] {
        fs::hard_link(site.release("v1").join(f), dc.join(f)).unwrap();
    }
    write_sha256sums(&dc);
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v2"]),
        "finalize v2",
    );
    for f in ["a.txt", "lib/b.js"] {
        assert_ne!(
            ino(&site.release("v2").join(f)),
            ino(&dc.join(f)),
            "v2/{f} shares its inode with deploy-cache/{f}"
        );
    }
}

/// The keeper's own unlinks (pruning an older release, removing the partial tree of a
/// rejected upload) move the ctime of files the live release shares with them. They are
/// recorded (`.release-keeper/changes`), so the next release still links those files
/// instead of taking them for edited by hand and copying them.
#[test]
fn pruning_and_rejected_builds_do_not_cost_the_next_release_its_links() {
    let site = Site::new();
    let cfg = site.write_config("web", "keep = 1", "");
    let mut svc = Service::start_config(&cfg);
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("lib/f{i}.js"), format!("file {i}").into_bytes()))
        .collect();
    site.deploy(&as_refs(&files), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let dc = site.deploy_cache();
    for (n, id) in ["v2", "v3"].into_iter().enumerate() {
        fs::write(dc.join("changing.txt"), format!("{n}")).unwrap();
        write_sha256sums(&dc);
        site.drop_marker(&format!("id = \"{id}\"\n"));
        svc.wait_release_event("release.activated", id);
    }
    svc.wait_release_event("release.pruned", "v1");
    // Deploys are seconds apart, not milliseconds: clear of the slack a span starts with.
    let pause = || std::thread::sleep(std::time::Duration::from_millis(60));
    let all_linked = |svc: &Service, id: &str| {
        let done = svc.wait_release_event("release.finalized", id);
        svc.wait_release_event("release.activated", id);
        assert_eq!(
            done["linked"],
            done["files"],
            "every file of {id} is the previous release's: all linked\n{}",
            svc.log_text()
        );
    };
    pause();
    site.drop_marker("id = \"v4\"\n");
    all_linked(&svc, "v4");
    // Rewritten in place so the manifest no longer matches: the build links what it can
    // into its partial tree, meets the mismatch, and removes the tree.
    fs::write(dc.join("lib/f0.js"), b"not what the manifest says").unwrap();
    site.drop_marker("id = \"bad\"\n");
    svc.wait_release_event("release.rejected", "bad");
    fs::write(dc.join("lib/f0.js"), b"file 0").unwrap();
    pause();
    site.drop_marker("id = \"v5\"\n");
    all_linked(&svc, "v5");
    assert_eq!(
        ino(&site.release("v4").join("lib/f7.js")),
        ino(&site.release("v5").join("lib/f7.js"))
    );
    svc.stop();
}

/// A change log the keeper cannot write would make every later release a full copy of
/// the files its operations touched: said (`site.error`, naming the file), not swallowed.
#[test]
fn a_change_log_that_cannot_be_written_is_reported() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let log = site.root.join(".release-keeper/changes");
    fs::create_dir_all(&log).unwrap();
    site.deploy(&[("a.txt", b"alpha" as &[u8])], "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let ev = svc.wait_event("site.error", |v| v["path"].as_str() == log.to_str(), WAIT);
    assert!(
        ev["message"]
            .as_str()
            .is_some_and(|m| m.contains("copies the files")),
        "{ev}"
    );
    svc.stop();
}

/// A file of the previous release edited by hand (same size, mtime set back) right before
/// the next build starts: its ctime lies in the slack the build's own span allows before
/// it, which counted as the build's own change, so the edited file was shared into the new
/// release unread and went live not matching its manifest. Only inodes the build itself
/// linked are its own changes.
#[test]
fn a_file_edited_just_before_a_build_is_not_shared_into_it() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let files: Vec<(&str, &[u8])> = vec![
        ("d/f.txt", b"good content\n"),
        ("index.html", b"<p>1</p>\n"),
    ];
    site.stage_upload(&files);
    finalize_expecting(&cfg, "web", "v1", &[], 0);
    // Out of the slack of v1's own span, so only the edit can move the ctime.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for round in 2..=6 {
        let prev = site.release(&format!("v{}", round - 1)).join("d/f.txt");
        let mtime = fs::metadata(&prev).unwrap().modified().unwrap();
        let perm = fs::metadata(&prev).unwrap().permissions();
        make_writable(&prev);
        let mut w = fs::metadata(&prev).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut w, 0o644);
        fs::set_permissions(&prev, w).unwrap();
        fs::write(&prev, b"EVIL content\n").unwrap();
        let f = fs::File::options().write(true).open(&prev).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        fs::set_permissions(&prev, perm).unwrap();
        // At once: the build's span starts within milliseconds of the edit.
        let id = format!("v{round}");
        finalize_expecting(&cfg, "web", &id, &[], 0);
        assert_eq!(
            fs::read(site.release(&id).join("d/f.txt")).unwrap(),
            b"good content\n",
            "round {round}: the edited file of the previous release was shared"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
