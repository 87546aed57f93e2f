#!/usr/bin/env bash
# The hand-written deploy recipes release-keeper is compared with (bench/compare.sh).
#
#   recipe.sh cp    SRC ROOT ID        cp -a, sha256sum -c, rename, ln -s + mv -T
#   recipe.sh rsync SRC ROOT ID PREV   rsync -a --link-dest=../PREV, sha256sum -c, same swap
#
# SRC is the upload (deploy-cache/ with its SHA256SUMS); ROOT holds releases/ and current.
# No prune step: release-keeper's pruning is kept out of the timed runs too (keep is set
# high in the benchmark config), so both sides do the same work.
set -eu
mode=$1 src=$2 root=$3 id=$4
cd "$root"
case $mode in
cp)
    cp -a "$src" "releases/.tmp-$id"
    ;;
rsync)
    prev=$5
    rsync -a --link-dest="../$prev" "$src/" "releases/.tmp-$id/"
    ;;
*)
    echo "usage: $0 cp|rsync SRC ROOT ID [PREV]" >&2
    exit 2
    ;;
esac
(cd "releases/.tmp-$id" && sha256sum -c --quiet SHA256SUMS)
mv "releases/.tmp-$id" "releases/$id"
ln -sfn "releases/$id" current.tmp
mv -T current.tmp current
