#!/usr/bin/env python3
"""Test-tree generator for bench/compare.sh.

  gen.py tree DIR --files N --bytes B [--seed S]
      A web-app-like build: N files totalling about B bytes (lognormal sizes: many small
      files, a few large ones) in nested directories, plus DIR/SHA256SUMS (GNU format).
  gen.py mutate DIR --fraction F [--seed S]
      Rewrites F of the listed files the way rsync does (new content in a temp file
      `.name.XXXXXX` beside it, then rename over it) and updates their SHA256SUMS lines
      (the manifest itself is replaced by temp + rename as well).
  gen.py small DIR --files N --seq K
      A small upload: N files (~8 KiB each, content depends on K) in a few directories,
      plus SHA256SUMS. Rewrites only what changed, by temp + rename.

Names are plain ASCII, so the manifest needs no escaping.
"""

import argparse
import hashlib
import math
import os
import random
import sys

MANIFEST = "SHA256SUMS"


def write_replace(path, data):
    d, name = os.path.split(path)
    tmp = os.path.join(d, "." + name + "." + os.urandom(3).hex())
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_manifest(root, sums):
    lines = "".join(f"{sums[p]}  {p}\n" for p in sorted(sums))
    write_replace(os.path.join(root, MANIFEST), lines.encode())


def read_manifest(root):
    sums = {}
    with open(os.path.join(root, MANIFEST)) as f:
        for line in f:
            h, p = line.rstrip("\n").split("  ", 1)
            sums[p] = h
    return sums


def make_dirs(rng, n_dirs):
    """A nested directory layout: each new directory goes under a random earlier one
    (depth at most 6), so some directories are deep and some are wide."""
    top = ["assets", "vendor", "public", "app", "resources", "lib"]
    dirs = list(top)
    while len(dirs) < n_dirs:
        parent = rng.choice(dirs)
        if parent.count("/") >= 5:
            continue
        dirs.append(f"{parent}/d{len(dirs):05d}")
    return dirs


def sizes_for(rng, n, total):
    # Lognormal around ~4 KiB, capped at 16 MiB, then scaled to the wanted total.
    raw = [min(rng.lognormvariate(math.log(4096), 1.6), 16 << 20) for _ in range(n)]
    scale = total / sum(raw)
    return [max(1, int(s * scale)) for s in raw]


def cmd_tree(a):
    rng = random.Random(a.seed)
    os.makedirs(a.dir, exist_ok=True)
    dirs = make_dirs(rng, max(6, a.files // 20))
    for d in dirs:
        os.makedirs(os.path.join(a.dir, d), exist_ok=True)
    sizes = sizes_for(rng, a.files, a.bytes)
    exts = [".js", ".css", ".php", ".html", ".png", ".svg", ".json", ".map", ".woff2"]
    sums = {}
    pool = os.urandom(1 << 20)  # random bytes reused at random offsets: fast, incompressible
    for i, size in enumerate(sizes):
        rel = f"{rng.choice(dirs)}/f{i:06d}{rng.choice(exts)}"
        chunks = []
        left = size
        while left > 0:
            off = rng.randrange(0, len(pool) - 1)
            take = min(left, len(pool) - off)
            chunks.append(pool[off:off + take])
            left -= take
        data = f"{i}\n".encode() + b"".join(chunks)  # unique content per file
        with open(os.path.join(a.dir, rel), "wb") as f:
            f.write(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    write_manifest(a.dir, sums)
    total = sum(os.path.getsize(os.path.join(a.dir, p)) for p in sums)
    print(f"{len(sums)} files, {len(dirs)} dirs, {total} bytes", file=sys.stderr)


def cmd_mutate(a):
    rng = random.Random(a.seed)
    sums = read_manifest(a.dir)
    paths = sorted(sums)
    n = max(1, round(len(paths) * a.fraction))
    for rel in rng.sample(paths, n):
        path = os.path.join(a.dir, rel)
        size = os.path.getsize(path)
        new_size = max(1, int(size * rng.uniform(0.9, 1.1)))
        data = os.urandom(new_size)
        write_replace(path, data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    write_manifest(a.dir, sums)
    print(f"rewrote {n} of {len(paths)} files", file=sys.stderr)


def cmd_small(a):
    os.makedirs(a.dir, exist_ok=True)
    sums = {}
    for i in range(a.files):
        rel = f"d{i % 4}/sub{i % 3}/f{i:04d}.js"
        os.makedirs(os.path.join(a.dir, os.path.dirname(rel)), exist_ok=True)
        data = (f"// upload {a.seq} file {i}\n".encode() * 300)[:8192]
        write_replace(os.path.join(a.dir, rel), data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    write_manifest(a.dir, sums)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tree")
    t.add_argument("dir")
    t.add_argument("--files", type=int, required=True)
    t.add_argument("--bytes", type=int, required=True)
    t.add_argument("--seed", type=int, default=1)
    m = sub.add_parser("mutate")
    m.add_argument("dir")
    m.add_argument("--fraction", type=float, required=True)
    m.add_argument("--seed", type=int, default=2)
    s = sub.add_parser("small")
    s.add_argument("dir")
    s.add_argument("--files", type=int, required=True)
    s.add_argument("--seq", type=int, required=True)
    a = p.parse_args()
    {"tree": cmd_tree, "mutate": cmd_mutate, "small": cmd_small}[a.cmd](a)


if __name__ == "__main__":
    main()
