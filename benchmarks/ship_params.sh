#!/usr/bin/env bash
# Moves a checkpoint's params from one device machine to the next, whose 30-minute hold
# may end mid-recipe: `pack` (on the first machine) exports them in bf16
# (scripts/export_params.py) and splits the archive into 15 MB parts under OUT_DIR (a
# call brings back at most 8 files of 16 MiB); copy the parts into a git-ignored folder
# named in the next call's carry, where `unpack` puts the checkpoint into WORKDIR (made
# if missing, merged if not), for init_from and eval.py.
#   bash benchmarks/ship_params.sh pack WORKDIR OUT_DIR NAME
#   bash benchmarks/ship_params.sh unpack PARTS_DIR NAME WORKDIR
set -euo pipefail
case $1 in
  pack)
    src=$2 out=$3 name=$4 tmp=$(mktemp -d)
    python scripts/export_params.py --src="$src" --dst="$tmp/$name"
    mkdir -p "$out"
    tar cf - -C "$tmp" "$name" | split -b 15M -d - "$out/$name.tar.part-"
    rm -rf "$tmp"
    ls -l "$out"/"$name".tar.part-* ;;
  unpack)
    parts=$2 name=$3 dst=$4 tmp=$(mktemp -d)
    cat "$parts/$name".tar.part-* | tar xf - -C "$tmp"
    mkdir -p "$dst"   # merged: a workdir holding the stage's eval results keeps them
    cp -r "$tmp/$name/." "$dst/"
    rm -rf "$tmp" ;;
  *) echo "usage: $0 pack WORKDIR OUT_DIR NAME | unpack PARTS_DIR NAME WORKDIR" >&2; exit 2 ;;
esac
