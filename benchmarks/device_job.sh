#!/usr/bin/env bash
# Starts a long job on the device machine in the background, from a copy of the tree:
#   bash benchmarks/device_job.sh LOG COMMAND [ARGS...]
# then `bash benchmarks/device_poll.sh DIR LOG SECONDS $OUT` in the calls that follow.
# Every device call copies the working tree onto the machine again, rewriting its files
# under a job still running: a process the job starts meanwhile (a grain worker
# importing the package) can find a module missing or half-written. The eighth accuracy
# run's joint stage died so (docs/results.md). The job runs in JOB_TREE (default
# /tmp/job_tree), a copy made here that later calls leave alone; its output paths
# should be absolute.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/device_job.sh LOG COMMAND [ARGS...]" >&2
  exit 2
fi
log=$1
shift
tree=${JOB_TREE:-/tmp/job_tree}
rm -rf "$tree"
mkdir -p "$tree"
# The carried wheels are installed already (device_prelude.sh); git and local
# environments are not the job's.
tar cf - --exclude=./.git --exclude=./.whl --exclude=./.venv . | tar xf - -C "$tree"
cd "$tree"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
setsid nohup "$@" > "$log" 2>&1 < /dev/null &
echo "started in $tree (pid $!), log $log"
