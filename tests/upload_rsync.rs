//! A build uploaded with the real rsync becomes a verified, read-only release.
mod common;

use common::*;
use std::fs;

#[test]
fn rsync_upload_becomes_activated_release() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    reference_build(&build);

    rsync_upload(&build, &site.deploy_cache());
    // rsync preserved the setuid bit in the upload, so the test is meaningful.
    assert_eq!(mode(&site.deploy_cache().join("bin/setuid-helper")), 0o4755);
    site.drop_marker("");

    let ev = svc.wait_event("release.activated", |_| true, WAIT);
    let id = release_of(&ev)
        .unwrap_or_else(|| panic!("release.activated lacks `release`: {ev}"))
        .to_string();
    check_release(&site, &svc, &build, &id);
    assert!(
        ev.get("site").and_then(|s| s.as_str()).is_some(),
        "events carry `site`: {ev}"
    );
    svc.stop();
}

#[test]
fn rsync_mirror_second_deploy_only_changes_what_changed() {
    // deploy-cache as a persistent rsync mirror: second deploy sends only the diff.
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    reference_build(&build);
    rsync_upload(&build, &site.deploy_cache());
    site.drop_marker("");
    let first = svc.wait_event("release.activated", |_| true, WAIT);
    let first_id = release_of(&first).unwrap().to_string();

    // Change one file, delete one, add one; regenerate manifest; mirror again.
    fs::write(build.join("public/css/site.css"), b"body { color: blue }\n").unwrap();
    fs::remove_file(build.join("bin/console")).unwrap();
    write_tree(&build, &[("public/new.txt", b"new\n")]);
    write_sha256sums(&build);
    rsync_upload(&build, &site.deploy_cache());
    site.drop_marker("");

    let second = svc.wait_event(
        "release.activated",
        |v| release_of(v).is_some_and(|r| r != first_id),
        WAIT,
    );
    let second_id = release_of(&second).unwrap().to_string();
    assert!(is_timestamp_id(&second_id), "id {second_id:?}");
    assert_eq!(site.current_id().as_deref(), Some(second_id.as_str()));
    assert_eq!(
        tree(&site.release(&second_id), &[]),
        tree(&build, &[]),
        "second release should equal the updated build"
    );
    assert!(
        !site.release(&second_id).join("bin/console").exists(),
        "file deleted from the upload must not be in the new release"
    );
    // The first release is untouched.
    assert_eq!(
        fs::read(site.release(&first_id).join("public/css/site.css")).unwrap(),
        b"body { color: red }\n"
    );
    svc.stop();
}

#[test]
fn release_dir_is_never_visible_half_done() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    let files: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("d{}/f{i}.bin", i % 10), vec![(i % 251) as u8; 8192]))
        .collect();
    write_tree(&build, &as_refs(&files));
    write_sha256sums(&build);
    let want = tree(&build, &[]);
    rsync_upload(&build, &site.deploy_cache());
    site.drop_marker("id = \"big\"\n");

    // Poll releases/big while the keeper works: once visible, it must be complete.
    let rel = site.release("big");
    let deadline = std::time::Instant::now() + WAIT;
    while !rel.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "releases/big never appeared"
        );
        std::thread::yield_now();
    }
    assert_eq!(
        tree(&rel, &[]),
        want,
        "releases/<id> visible before it was complete"
    );
    svc.wait_release_event("release.activated", "big");
    svc.stop();
}

/// A build made in a `mktemp -d` directory (0700) and mirrored with `rsync -a build/`
/// gives `deploy-cache/` itself mode 0700. The release's own directory must still be
/// readable by the web server (another user): 0555, not 0500.
#[test]
fn a_private_build_directory_does_not_make_the_release_unreadable() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    reference_build(&build);
    fs::set_permissions(&build, fs::Permissions::from_mode(0o700)).unwrap();
    rsync_upload(&build, &site.deploy_cache());
    assert_eq!(
        mode(&site.deploy_cache()),
        0o700,
        "rsync -a carried the mode over"
    );
    site.drop_marker("");

    let ev = svc.wait_event("release.activated", |_| true, WAIT);
    let id = release_of(&ev).unwrap().to_string();
    assert_eq!(mode(&site.release(&id)), 0o555);
    // Entries inside keep their uploaded bits, write bits removed.
    assert_eq!(mode(&site.release(&id).join("bin/console")), 0o555);
    svc.stop();
}
