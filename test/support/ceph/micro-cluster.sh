#!/usr/bin/env bash
# A real single-node Ceph cluster for tests: one monitor, one manager, one OSD on a file-backed BlueStore,
# all bound to 127.0.0.1, cephx on with generated keys, small memory targets. No systemd: the daemons run
# from a temp directory and fork themselves; their pid files live in DIR/run.
#
#   micro-cluster.sh start DIR [--watch-pid PID] [--deadline SECONDS]
#       DIR must not exist or be empty. Prints KEY=VALUE lines on stdout at the end (CEPH_CONF, keyrings,
#       the monitor address, start seconds). --watch-pid: a watchdog stops the cluster when PID exits
#       (so a killed test run leaves no daemons behind).
#   micro-cluster.sh stop DIR       clean shutdown (SIGTERM, bounded wait, SIGKILL), then removes DIR
#   micro-cluster.sh usage DIR      RSS (KiB) and CPU seconds of each daemon, KEY=VALUE lines
#
# Clients made for the tests, each with its own keyring in DIR/keys/:
#   client.admin      everything (the ceph/rbd CLIs use it through ceph.conf)
#   client.vublk      mon 'profile rbd', osd 'profile rbd pool=rbd'  (what a vublk host gets)
#   client.reader     mon 'profile rbd', osd 'profile rbd-read-only pool=rbd'  (permission-denied tests)
#
# Invariant: every wait below has a deadline; a start that fails stops what it started and exits non-zero.
set -euo pipefail

die() { echo "micro-cluster: $*" >&2; exit 1; }
self=$(readlink -f "$0")

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|stop|usage DIR [--watch-pid PID] [--deadline S]"
shift 2

daemon_pids() {
  local f
  for f in "$dir"/run/{mon.a,mgr.x,osd.0}.pid; do
    [ -e "$f" ] || continue
    local pid
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
  return 0
}

stop_cluster() {
  [ -d "$dir" ] || return 0
  # The watchdog first, so it does not race this stop.
  if [ -f "$dir/run/watchdog.pid" ]; then
    local w
    w=$(cat "$dir/run/watchdog.pid" 2>/dev/null || true)
    [ -n "$w" ] && [ "$w" != "$$" ] && kill "$w" 2>/dev/null || true
  fi
  local pids
  pids=$(daemon_pids)
  if [ -n "$pids" ]; then
    # OSD first so it does not spend time reporting to a monitor that is already gone.
    local osd
    osd=$(cat "$dir/run/osd.0.pid" 2>/dev/null || true)
    if [ -n "$osd" ] && kill -0 "$osd" 2>/dev/null; then
      kill -TERM "$osd" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$osd" 2>/dev/null || break; sleep 0.1; done
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 100); do
      [ -z "$(daemon_pids)" ] && break
      sleep 0.1
    done
    pids=$(daemon_pids)
    if [ -n "$pids" ]; then
      echo "micro-cluster: daemons $pids ignored SIGTERM for 10 s; SIGKILL" >&2
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -rf "$dir"
}

usage_report() {
  local hz name pid stat
  hz=$(getconf CLK_TCK)
  for name in mon.a mgr.x osd.0; do
    pid=$(cat "$dir/run/$name.pid" 2>/dev/null || true)
    if [ -z "$pid" ] || [ ! -r "/proc/$pid/stat" ]; then
      echo "${name//./_}_RSS_KIB=0"
      continue
    fi
    echo "${name//./_}_RSS_KIB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")"
    echo "${name//./_}_HWM_KIB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")"
    # utime + stime (fields 14, 15) in clock ticks; the comm field has no spaces for ceph daemons.
    stat=$(cat "/proc/$pid/stat")
    echo "${name//./_}_CPU_S=$(echo "$stat" | awk -v hz="$hz" '{ printf "%.2f", ($14 + $15) / hz }')"
  done
}

case "$cmd" in
  stop) stop_cluster; exit 0 ;;
  usage) usage_report; exit 0 ;;
  start) ;;
  *) die "unknown command $cmd" ;;
esac

watch_pid=""
deadline_s=240
while [ $# -gt 0 ]; do
  case "$1" in
    --watch-pid) watch_pid=$2; shift 2 ;;
    --deadline) deadline_s=$2; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done

for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)"
done
if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then die "$dir exists and is not empty"; fi

started=$(date +%s.%N)
deadline=$(( $(date +%s) + deadline_s ))
mkdir -p "$dir"/{run,log,keys,mon,mgr,osd}
dir=$(cd "$dir" && pwd)
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "micro-cluster: start failed; logs follow" >&2; tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true; stop_cluster; fi' EXIT

time_left() { echo $(( deadline - $(date +%s) )); }
# Runs a ceph CLI command with what is left of the deadline as its bound.
bounded() {
  local left
  left=$(time_left)
  [ "$left" -gt 0 ] || die "deadline of ${deadline_s}s passed before: $*"
  timeout --kill-after=5 "$left" "$@"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
osd_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
mon_port=$(free_port)
mon_addr="v2:127.0.0.1:$mon_port"
conf="$dir/ceph.conf"

# Sizes are in bytes. osd_memory_target's floor in 16.2 is 896 MiB; the caches are pinned well below it
# (autotune off) so the OSD stays small on an idle test cluster.
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = [$mon_addr]
public_network = 127.0.0.0/8
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $dir/keys/\$name.keyring
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
log_file = $dir/log/\$name.log
crash_dir = $dir/log/crash
log_to_stderr = false
err_to_stderr = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
auth_allow_insecure_global_id_reclaim = false
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
ms_async_op_threads = 2

[mon]
mon_data = $dir/mon/\$cluster-\$id
mon_allow_pool_delete = true
mon_cluster_log_file = $dir/log/mon-cluster.log
public_addr = 127.0.0.1

[mgr]
mgr_data = $dir/mgr/\$cluster-\$id
mgr_initial_modules =
public_addr = 127.0.0.1

[osd]
osd_data = $dir/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 4294967296
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_memory_target = 939524096
osd_memory_cache_min = 67108864
osd_memory_base = 134217728
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_max_pg_log_entries = 500
osd_min_pg_log_entries = 100
osd_class_load_list = *
osd_class_default_list = *
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
EOF
export CEPH_CONF=$conf

# Keys: each daemon and client gets its own keyring file ($name.keyring); the monitor's mkfs imports all of
# them with their caps, so no daemon needs 'ceph auth add' round trips after the monitor is up.
keys="$dir/keys"
mk_key() {
  local name=$1 file=$2
  shift 2
  ceph-authtool --create-keyring "$keys/$file.keyring" --gen-key -n "$name" "$@" >/dev/null
}
mk_key mon. mon.a --cap mon 'allow *'
mk_key client.admin client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
mk_key mgr.x mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
mk_key osd.0 osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
mk_key client.vublk client.vublk --cap mon 'profile rbd' --cap osd 'profile rbd pool=rbd'
mk_key client.reader client.reader --cap mon 'profile rbd' --cap osd 'profile rbd-read-only pool=rbd'
cp "$keys/mon.a.keyring" "$dir/mon-mkfs.keyring"
for name in client.admin mgr.x osd.0 client.vublk client.reader; do
  ceph-authtool "$dir/mon-mkfs.keyring" --import-keyring "$keys/$name.keyring" >/dev/null
done
mkdir -p "$dir/mgr/ceph-x" "$dir/osd/ceph-0"
cp "$keys/mgr.x.keyring" "$dir/mgr/ceph-x/keyring"

monmaptool --create --fsid "$fsid" --addv a "[$mon_addr]" "$dir/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon-mkfs.keyring" >/dev/null
rm -f "$dir/mon-mkfs.keyring" "$dir/monmap"
ceph-mon -i a

if [ -n "$watch_pid" ]; then
  # Detached from our stdout so whoever reads this script's output sees EOF when start returns.
  (
    while kill -0 "$watch_pid" 2>/dev/null && [ -d "$dir" ]; do sleep 2; done
    # exec: the stop then runs under the pid recorded in watchdog.pid and does not kill itself.
    exec bash "$self" stop "$dir"
  ) </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/run/watchdog.pid"
fi

# The monitor answers once it formed its one-member quorum.
bounded ceph --connect-timeout 10 -s >/dev/null || die "monitor did not answer"

osd_id=$(bounded ceph osd new "$osd_uuid")
[ "$osd_id" = 0 ] || die "unexpected OSD id '$osd_id'"
bounded ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1 || die "ceph-osd --mkfs failed"
ceph-osd -i 0
ceph-mgr -i x

bounded ceph osd pool create rbd 8 8 >/dev/null 2>&1
bounded ceph osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
bounded rbd pool init rbd
# The pool is usable once an object write completes (its placement group is active).
bounded rados -p rbd put micro-cluster-probe "$conf"
bounded rados -p rbd rm micro-cluster-probe

# Ready: report (the monitor may still say HEALTH_WARN briefly, e.g. for the mgr coming up; data is served).
health=$(bounded ceph health 2>/dev/null || echo unknown)
finished=$(date +%s.%N)
trap - EXIT
echo "CEPH_CONF=$conf"
echo "CEPH_DIR=$dir"
echo "CEPH_MON_ADDR=$mon_addr"
echo "CEPH_MON_PORT=$mon_port"
echo "CEPH_ADMIN_KEYRING=$keys/client.admin.keyring"
echo "CEPH_VUBLK_KEYRING=$keys/client.vublk.keyring"
echo "CEPH_READER_KEYRING=$keys/client.reader.keyring"
echo "CEPH_HEALTH=${health%% *}"
echo "CEPH_START_SECONDS=$(python3 -c "print(round($finished - $started, 2))")"
