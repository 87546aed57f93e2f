#!/usr/bin/env python3
"""Marker-to-swap latency of the running service (bench/compare.sh, figure 3).

  latency.py BIN ROOT --iterations N --files F --out FILE

Starts `BIN run --root ROOT --log-format json`, waits for `daemon.started`, then per
iteration: writes an F-file upload into ROOT/deploy-cache (with SHA256SUMS), waits for the
file system to go quiet, writes the marker and takes t0 right after its close(2); t1 is
when inotify reports the rename of a new `current` into ROOT (the keeper's swap is a
rename over `current`), checked with readlink. No polling, so the measuring side takes no
CPU from the service. The `release.activated` log line (wall clock, us) minus the wall
clock at t0 is recorded as a cross-check, and the log splits the latency into phases.
Writes one line per iteration to FILE: `<inotify ms> <log ms> <marker close to
upload.detected> <upload.detected to release.finalized> <release.finalized to
release.activated>` (ms), and the service's stderr log to FILE.log.
"""

import argparse
import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in bench/
import gen  # noqa: E402

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

libc = ctypes.CDLL("libc.so.6", use_errno=True)


class Inotify:
    def __init__(self, path):
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), IN_MOVED_TO | IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def drain(self):
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait_name(self, name, deadline):
        """Blocks until an event for `name` arrives; returns time.monotonic() at that point."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            now = time.monotonic()
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            i = 0
            while i < len(buf):
                _wd, mask, _cookie, ln = struct.unpack_from("iIII", buf, i)
                n = buf[i + 16:i + 16 + ln].rstrip(b"\0")
                i += 16 + ln
                if n == name and mask & IN_MOVED_TO:
                    return now


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("root")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    root = os.path.abspath(a.root)
    os.makedirs(root, exist_ok=True)
    log = open(a.out + ".log", "w")
    svc = subprocess.Popen([a.bin, "run", "--root", root, "--log-format", "json"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    activated = {}  # release id -> wall-clock seconds of the release.activated line
    seen = {}  # (event, release id) -> wall-clock seconds
    lock = threading.Lock()

    def reader():
        for line in svc.stderr:
            log.write(line)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "daemon.started":
                started.set()
            elif ev.get("event") in ("upload.detected", "release.finalized", "release.activated"):
                ts = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
                with lock:
                    seen[(ev["event"], ev.get("release"))] = ts
                    if ev["event"] == "release.activated":
                        activated[ev.get("release")] = ts

    threading.Thread(target=reader, daemon=True).start()
    if not started.wait(30):
        svc.kill()
        sys.exit("service did not log daemon.started within 30 s")

    cache = os.path.join(root, "deploy-cache")
    marker = os.path.join(cache, ".release-ready")
    current = os.path.join(root, "current")
    ino = Inotify(root)
    results = []
    failures = 0
    try:
        for it in range(a.iterations):
            rid = f"lat-{os.getpid()}-{it:03d}"
            gen.cmd_small(argparse.Namespace(dir=cache, files=a.files, seq=it))
            os.sync()
            time.sleep(0.3)  # let the previous release's prune/heal finish
            before = os.readlink(current) if os.path.islink(current) else None
            ino.drain()
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, f'id = "{rid}"\n'.encode())
            os.close(fd)
            t0 = time.monotonic()
            w0 = time.time()
            t1 = None
            deadline = t0 + 30
            while True:
                t = ino.wait_name(b"current", deadline)
                if t is None:
                    break
                if os.readlink(current) != before:
                    t1 = t
                    break
            if t1 is None:
                failures += 1
                print(f"iteration {it}: current did not change within 30 s", file=sys.stderr)
                continue
            for _ in range(200):
                with lock:
                    w1 = activated.get(rid)
                if w1 is not None:
                    break
                time.sleep(0.01)
            log_ms = (w1 - w0) * 1000 if w1 is not None else float("nan")
            with lock:
                det = seen.get(("upload.detected", rid))
                fin = seen.get(("release.finalized", rid))
            nan = float("nan")
            wake = (det - w0) * 1000 if det else nan  # marker close -> upload.detected
            build = (fin - det) * 1000 if det and fin else nan  # -> release.finalized
            act = (w1 - fin) * 1000 if fin and w1 else nan  # -> release.activated
            results.append(((t1 - t0) * 1000, log_ms, wake, build, act))
    finally:
        svc.terminate()
        try:
            svc.wait(30)
        except subprocess.TimeoutExpired:
            svc.kill()
    with open(a.out, "w") as f:
        for r in results:
            f.write(" ".join(f"{x:.2f}" for x in r) + "\n")
    if failures:
        sys.exit(f"{failures} iteration(s) failed")


if __name__ == "__main__":
    main()
