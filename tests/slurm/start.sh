#!/usr/bin/env bash
# Start a two-node Slurm cluster on this host under DIR: munged, slurmctld, and slurmd -N n1 / n2.
#
#   tests/slurm/start.sh /tmp/medclf-slurm && export SLURM_CONF=/tmp/medclf-slurm/slurm.conf
#   sinfo; sbatch ...; tests/slurm/stop.sh /tmp/medclf-slurm
#
# Runs as root (slurmd starts jobs as any user). Returns once both nodes are idle; on failure it
# prints why (the daemons' log tails) and exits non-zero. Ports: BASE_PORT (controller) and the two
# after it (nodes); default: three free consecutive ports.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(mkdir -p "${1:?usage: start.sh DIR}" && cd "$1" && pwd)"
for tool in munged slurmctld slurmd sinfo scontrol; do
  command -v "$tool" >/dev/null || { echo "start.sh: $tool not installed (bash .ci/install)" >&2; exit 1; }
done

base="${BASE_PORT:-$(python3 - <<'PY'
import random, socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
while True:
    base = random.randrange(17000, 29000, 3)
    if all(free(base + i) for i in range(3)):
        print(base)
        break
PY
)}"

mkdir -p "$dir"/{munge,state,log,spool/n1,spool/n2}
chmod 700 "$dir/munge"
sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$base|g" \
    -e "s|@NODE_PORT_1@|$((base + 1))|g" -e "s|@NODE_PORT_2@|$((base + 2))|g" \
    "$here/slurm.conf.in" > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"

fail() {
  echo "start.sh: $*" >&2
  for f in "$dir"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}

# A private munged with its own socket and a fresh key: a system munged, its key or another test
# cluster is never touched.
(umask 077 && head -c 1024 /dev/urandom > "$dir/munge/munge.key")
munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
       --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
       --seed-file="$dir/munge/munged.seed" || fail "munged did not start"

slurmctld -f "$SLURM_CONF" -i || fail "slurmctld did not start"   # -i: ignore state of a previous run
for i in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || fail "slurmctld does not answer"
slurmd -f "$SLURM_CONF" -N n1 || fail "slurmd n1 did not start"
slurmd -f "$SLURM_CONF" -N n2 || fail "slurmd n2 did not start"

for i in $(seq 150); do
  [ "$(sinfo -h -N -o '%N %t' | grep -c ' idle$')" = 2 ] && { sinfo -N; exit 0; }
  sleep 0.2
done
fail "nodes not idle after 30 s: $(sinfo -h -N -o '%N %t' | tr '\n' ' ')"
