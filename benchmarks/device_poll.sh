#!/usr/bin/env bash
# Waits for a background job (started with setsid on the device machine) to write
# DIR/DONE when it ends, at most SECONDS, then copies its log and small results (json, md,
# png, logs; no checkpoints) into OUT as one archive. A device command is cut at
# 10 minutes, so a longer job runs in the background and successive calls poll it.
#   bash benchmarks/device_poll.sh DIR LOG SECONDS OUT
dir=$1 log=$2 seconds=$3 out=$4
# A poll that lands on a fresh machine (the last one was given back) finds no job: say so
# at once rather than wait out SECONDS of device time.
if [ ! -d "$dir" ] || [ ! -e "$log" ]; then
  echo "no job here: $dir or $log is missing (a fresh machine? the job ended with the last one)"
  exit 1
fi
end=$((SECONDS + seconds))
while [ ! -e "$dir/DONE" ] && [ $SECONDS -lt $end ]; do
  sleep 10
done
[ -e "$dir/DONE" ] && echo "ended" || echo "still running"
cp "$log" "$out/log.txt"
tar czf "$out/results.tgz" -C "$dir" --exclude=checkpoints --exclude=tb . 2>/dev/null
tail -n 40 "$log"
