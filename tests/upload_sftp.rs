//! A build uploaded with the real OpenSSH sftp client (batch mode, sftp-server, no daemon).
mod common;

use common::*;

#[test]
fn sftp_upload_becomes_activated_release() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    reference_build(&build);

    // `put -r` skips symlinks, so the uploader creates it with `ln -s`; the setuid bit is set
    // explicitly so the upload really carries it. The marker goes last.
    sftp_upload(
        &build,
        &site.deploy_cache(),
        &[
            "ln -s js/app.js public/app.js".to_string(),
            "chmod 4755 bin/setuid-helper".to_string(),
        ],
        "",
        site.tmp.path(),
    );

    let ev = svc.wait_event("release.activated", |_| true, WAIT);
    let id = release_of(&ev)
        .unwrap_or_else(|| panic!("release.activated lacks `release`: {ev}"))
        .to_string();
    check_release(&site, &svc, &build, &id);
    svc.stop();
}

#[test]
fn sftp_upload_with_explicit_id_in_marker() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let build = site.tmp_path("build");
    write_tree(
        &build,
        &[
            ("index.html", b"<p>sftp</p>\n"),
            ("a/b/c/deep.txt", b"deep\n"),
        ],
    );
    write_sha256sums(&build);
    sftp_upload(
        &build,
        &site.deploy_cache(),
        &[],
        "id = \"sftp-1.0\"\nmessage = \"sftp deploy\"\n",
        site.tmp.path(),
    );
    svc.wait_release_event("release.activated", "sftp-1.0");
    assert_eq!(site.current_id().as_deref(), Some("sftp-1.0"));
    assert_eq!(tree(&site.release("sftp-1.0"), &[]), tree(&build, &[]));
    assert!(!site.marker_path().exists(), "marker consumed");
    svc.stop();
}
