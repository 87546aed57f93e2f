//! A disk too small for the upload, or the keeper's own directories refusing writes (a
//! read-only mount, wrong permissions): the release is deferred (not dropped), nothing is
//! left behind, `current` is untouched, and the upload is finalized once the server is
//! fixed. Needs root (it mounts a small tmpfs or a read-only bind mount); skipped
//! otherwise.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Unmounts the tmpfs when the test ends, whatever happens.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Option<Mount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then(|| Mount(dir.to_path_buf()))
}

#[test]
fn upload_larger_than_free_space_is_deferred_then_finalized_when_space_returns() {
    let site = Site::new();
    let Some(mount) = mount_tmpfs(&site.root, "40m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    fs::create_dir_all(site.deploy_cache()).unwrap();
    let mut svc = Service::start_root(&site.root);

    // 20 MiB of upload: with the upload itself on the same 40 MiB filesystem, the release
    // (20 MiB plus margin) does not fit.
    let blobs: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("assets/blob{i}.bin"), vec![i as u8; 1024 * 1024]))
        .collect();
    let files: Vec<(&str, &[u8])> = blobs
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    site.deploy(&files, "id = \"big\"\n");
    let ev = svc.wait_event("release.rejected", |v| v["retrying"] == true, WAIT);
    assert!(
        reason_of(&ev).contains("not enough free space"),
        "reason should say why: {ev}"
    );
    assert!(
        ev["message"]
            .as_str()
            .is_some_and(|m| m.contains("not enough space")),
        "the message names the cause: {ev}"
    );
    assert_eq!(site.current_id(), None, "current must stay untouched");
    // Nothing but a trigger (SIGHUP, the heal timer, a marker) retries: the keeper's own
    // claim of the marker once woke a second attempt at once, racing the checks below.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let attempts = svc
        .events("release.rejected")
        .into_iter()
        .filter(|v| v["retrying"] == true)
        .count();
    assert_eq!(
        attempts, 1,
        "the deferred upload was retried without a trigger"
    );
    assert!(
        site.hidden_release_entries().is_empty() && site.release_ids().is_empty(),
        "no partial or release left behind: {:?}",
        site.releases_entries()
    );
    assert_eq!(
        site.claim_count(),
        1,
        "the upload must be kept for a retry, not dropped"
    );

    // Space returns; SIGHUP (or the heal timer, or the next marker) retries it.
    let st = Command::new("mount")
        .args(["-o", "remount,size=200m"])
        .arg(&mount.0)
        .status()
        .unwrap();
    assert!(st.success(), "remount failed");
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.activated", "big");
    assert_eq!(site.current_id().as_deref(), Some("big"));
    assert_eq!(
        fs::read(site.release("big").join("assets/blob7.bin")).unwrap(),
        vec![7u8; 1024 * 1024]
    );
    svc.stop();
    drop(mount);
}

/// `releases/` refusing writes is the server's fault, not the upload's: rejecting the
/// upload consumed it, so it was not deployed once the operator fixed the mount or the
/// permissions. It is kept and finalized at the next healing pass after the fix.
#[test]
fn releases_dir_refusing_writes_defers_the_upload_until_fixed() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_and_activate(&site, &svc, "v1");
    let releases = site.releases_dir();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&releases)
        .arg(&releases)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !bind {
        eprintln!("skipped: cannot bind-mount here (needs root)");
        svc.stop();
        return;
    }
    let mount = Mount(releases.clone());
    let ro = Command::new("mount")
        .args(["-o", "remount,ro,bind"])
        .arg(&releases)
        .status()
        .unwrap();
    assert!(ro.success(), "remount read-only failed");

    site.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    let ev = svc.wait_event("release.rejected", |v| v["retrying"] == true, WAIT);
    assert!(
        reason_of(&ev).contains("releases"),
        "the reason names the directory that refused: {ev}"
    );
    // The message said "not enough space for the release" whatever the cause, sending
    // the operator to look at free space instead of the mount or the permissions.
    let message = ev["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("space") && message.contains("cannot write its own directories"),
        "the message names the cause: {ev}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(
        site.claim_count(),
        1,
        "the upload must be kept for a retry, not dropped"
    );

    drop(mount);
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}
