#!/usr/bin/env bash
# Stop the cluster that start.sh DIR started: cancel its jobs (and wait for them to end, so no
# job process outlives its slurmd), then stop the daemons by their pid files.
set -uo pipefail
dir="${1:?usage: stop.sh DIR}"
export SLURM_CONF="$dir/slurm.conf"
if [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q UP; then
  scancel --quiet --partition=debug 2>/dev/null
  for i in $(seq 60); do squeue -h -t RUNNING,COMPLETING 2>/dev/null | grep -q . || break; sleep 0.5; done
fi
for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || continue
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
done
exit 0
