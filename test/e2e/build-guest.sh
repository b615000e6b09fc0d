#!/usr/bin/env bash
# Builds the tiny Linux guest used by the QEMU end-to-end tests:
#   .cache/guest/vmlinuz            Debian cloud kernel
#   .cache/guest/initramfs.cpio.gz  busybox + virtio modules + /init (workloads below)
#   .cache/guest/pattern.bin        the data the "rw" workload writes, for host-side checks
# Idempotent: rebuilds only when this script changes; downloaded .debs are kept in
# .cache/guest/debs so a rebuild needs no network. Needs root (apt-get install of tools).
set -euo pipefail
trap 'echo "build-guest.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$repo/.cache/guest
debs=$out/debs
stamp=$out/stamp
dio_source=$repo/test/e2e/guest/dio-unaligned.c
# The guest changes with this script and with the C workload it compiles.
want_stamp=$(cat "${BASH_SOURCE[0]}" "$dio_source" | sha256sum | cut -d' ' -f1)

mkdir -p "$debs"
# Serialise concurrent builds (e.g. parallel test workers).
exec 9>"$out/.lock"
flock 9

if [[ -f $stamp && $(cat "$stamp") == "$want_stamp" && -f $out/vmlinuz && -f $out/initramfs.cpio.gz && -f $out/pattern.bin ]]; then
  echo "guest is up to date in $out"
  exit 0
fi

# Runs an apt command, refreshing the package lists once if it fails (fresh CI containers have none).
apt_retry() {
  "$@" || { apt-get update -qq && "$@"; }
}

missing=()
command -v cpio >/dev/null || missing+=(cpio)
command -v xz >/dev/null || missing+=(xz-utils)
command -v depmod >/dev/null && command -v modprobe >/dev/null || missing+=(kmod)
command -v gcc >/dev/null || missing+=(gcc)
[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
if ((${#missing[@]})); then
  apt_retry apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The metapackage only depends on the real, versioned kernel package; that is the one with files.
kernel_pkg_of_meta() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }' || true
}
shopt -s nullglob
kernel_debs=("$debs"/linux-image-[0-9]*-cloud-amd64_*.deb)
busybox_debs=("$debs"/busybox-static_*.deb)
if ((${#kernel_debs[@]} == 0 || ${#busybox_debs[@]} == 0)); then
  kernel_pkg=$(kernel_pkg_of_meta)
  if [[ -z $kernel_pkg ]]; then
    apt-get update -qq
    kernel_pkg=$(kernel_pkg_of_meta)
  fi
  [[ -n $kernel_pkg ]] || { echo "cannot resolve the package behind linux-image-cloud-amd64" >&2; exit 1; }
  rm -f "$debs"/*.deb
  # Sandbox user root: the _apt user cannot write into a root-owned cache directory.
  (cd "$debs" && apt_retry apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg" busybox-static)
  kernel_debs=("$debs"/linux-image-[0-9]*-cloud-amd64_*.deb)
  busybox_debs=("$debs"/busybox-static_*.deb)
fi
shopt -u nullglob

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg -x "${kernel_debs[0]}" "$work/kernel"
dpkg -x "${busybox_debs[0]}" "$work/busybox"
kver=$(basename "$work"/kernel/lib/modules/*)
echo "kernel $kver from $(basename "${kernel_debs[0]}")"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"

# The package ships no modules.dep (postinst generates it), so run depmod on the
# extracted tree, then let modprobe print the load order; "builtin" lines need nothing.
depmod -b "$work/kernel" "$kver"
: >"$root/etc/modules"
for mod in virtio_pci virtio_blk; do
  modprobe -d "$work/kernel" -S "$kver" --show-depends "$mod"
done | awk '!seen[$2]++' | while read -r kind what _; do
  case $kind in
    builtin) echo "  $what: built-in" ;;
    insmod)
      name=$(basename "$what")
      case $name in
        *.ko) cp "$what" "$root/lib/modules/$name" ;;
        # busybox insmod cannot read compressed modules.
        *.ko.xz) xz -dc "$what" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *) echo "unsupported module format: $what" >&2; exit 1 ;;
      esac
      echo "${name%.ko}" >>"$root/etc/modules"
      echo "  ${name%.ko}: module"
      ;;
    *) echo "unexpected modprobe output: $kind $what" >&2; exit 1 ;;
  esac
done

# util-linux's blkdiscard (DISCARD and, with -z, WRITE_ZEROES) with the shared libraries it needs:
# busybox's applet cannot zero-out; it lives apart so busybox --install does not shadow it.
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu"
mkdir -p "$root/opt/util-linux"
cp /usr/sbin/blkdiscard "$root/opt/util-linux/blkdiscard"
for lib in $(ldd /usr/sbin/blkdiscard | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do
  cp -L "$lib" "$root$lib"
done

# O_DIRECT with guest buffers 512 bytes past a page boundary (the bounce-buffer test); static, no libraries.
gcc -static -O2 -Wall -Werror -o "$root/opt/dio-unaligned" "$dio_source"

# 4 MiB; every 32-byte line names its 512-byte sector, so misplaced sectors show up in a hexdump.
awk 'BEGIN { for (s = 0; s < 8192; s++) for (l = 0; l < 16; l++) printf "vublk-e2e sector %06d line %02d\n", s, l }' \
  >"$root/pattern.bin"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the e2e guest. Kernel command line:
#   vublk.test=probe|rw|verify|unaligned|discard|readonly|resize|migrate|reconnect  workload on /dev/vda
#   vublk.rounds=N              write/read-back rounds of the reconnect workload (default 12)
#   vublk.offset=BYTES          where rw/verify put /pattern.bin on the disk
#   vublk.timeout=SECONDS       guest-side watchdog (default 60)
# Reports "VUBLK-E2E: ..." lines on the console and always powers off, never hangs.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "VUBLK-E2E: $*"; }
fail() {
  say "FAIL $*"
  dmesg | tail -n 20 | sed 's/^/VUBLK-E2E-DMESG: /'
  poweroff -f
}
param() {
  for word in $(cat /proc/cmdline); do
    case $word in "$1="*) echo "${word#*=}" ;; esac
  done
}
step() { echo "$*" >/tmp/step; }

workload=$(param vublk.test)
offset=$(param vublk.offset)
timeout=$(param vublk.timeout)
timeout=${timeout:-60}

# A wedged backend would block dd forever; report where we were stuck instead.
( sleep "$timeout"; say "FAIL timeout after ${timeout}s during: $(cat /tmp/step)"; poweroff -f ) &

step "loading modules"
for mod in $(cat /etc/modules); do
  insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
done

step "waiting for /dev/vda"
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do
  usleep 100000
  tries=$((tries + 1))
done
if [ ! -b /dev/vda ]; then
  [ "$workload" = probe ] && { say "PASS probe no-vda"; poweroff -f; }
  fail "$workload: /dev/vda did not appear"
fi

size=$(cat /sys/block/vda/size)
say "size=$size ro=$(cat /sys/block/vda/ro) queues=$(ls /sys/block/vda/mq | wc -l)"

expected=$(md5sum /pattern.bin | cut -d' ' -f1)
length=$(stat -c %s /pattern.bin)
readback() {
  step "$workload: reading back"
  dd if=/dev/vda of=/tmp/readback bs=1M iflag=skip_bytes,count_bytes,direct \
    skip="$offset" count="$length" status=none || fail "$workload: read failed"
  actual=$(md5sum /tmp/readback | cut -d' ' -f1)
  [ "$actual" = "$expected" ] || fail "$workload md5=$actual expected=$expected"
  say "PASS $workload md5=$actual"
}

case $workload in
  probe) say "PASS probe" ;;
  rw | verify)
    [ -n "$offset" ] || fail "$workload: vublk.offset missing"
    [ $((offset + length)) -le $((size * 512)) ] || fail "$workload: disk too small ($size sectors)"
    if [ "$workload" = rw ]; then
      step "rw: writing"
      # conv=fsync makes the guest send a FLUSH, which the backend must honour too.
      dd if=/pattern.bin of=/dev/vda bs=1M oflag=seek_bytes,direct seek="$offset" \
        conv=fsync,notrunc status=none || fail "rw: write failed"
      sync
      echo 3 >/proc/sys/vm/drop_caches
    fi
    readback
    ;;
  unaligned)
    # O_DIRECT writes and reads whose buffers start 512..3584 bytes past a page boundary (dio-unaligned.c),
    # then the usual read-back: a back-end needing 4096-byte buffers must bounce them and still be exact.
    [ -n "$offset" ] || fail "unaligned: vublk.offset missing"
    [ $((offset + length)) -le $((size * 512)) ] || fail "unaligned: disk too small ($size sectors)"
    step "unaligned: writing and reading back with unaligned buffers"
    result=$(/opt/dio-unaligned /dev/vda "$offset" /pattern.bin) || fail "unaligned: $result"
    say "$result"
    readback
    ;;
  discard)
    # Write the pattern, then DISCARD its first half and WRITE_ZEROES (blkdiscard -z) its second half.
    half=$((length / 2))
    step "discard: writing"
    dd if=/pattern.bin of=/dev/vda bs=1M oflag=seek_bytes,direct seek="$offset" conv=fsync,notrunc status=none ||
      fail "discard: write failed"
    step "discard: discarding"
    /opt/util-linux/blkdiscard -o "$offset" -l "$half" /dev/vda || fail "discard: blkdiscard failed"
    step "discard: zeroing"
    /opt/util-linux/blkdiscard -z -o $((offset + half)) -l "$half" /dev/vda || fail "discard: blkdiscard -z failed"
    echo 3 >/proc/sys/vm/drop_caches
    dd if=/dev/vda of=/tmp/zeroed bs=1M iflag=skip_bytes,count_bytes,direct skip=$((offset + half)) count="$half" status=none ||
      fail "discard: read failed"
    dd if=/dev/zero of=/tmp/zeroes bs="$half" count=1 status=none
    cmp -s /tmp/zeroed /tmp/zeroes || fail "discard: write-zeroes range does not read back as zeroes"
    say "PASS discard max_discard=$(cat /sys/block/vda/queue/discard_max_bytes) max_write_zeroes=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
    ;;
  readonly)
    [ "$(cat /sys/block/vda/ro)" = 1 ] || fail "readonly: the disk is writable"
    if dd if=/pattern.bin of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc status=none 2>/dev/null; then
      fail "readonly: a write succeeded"
    fi
    dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct status=none || fail "readonly: read failed"
    say "PASS readonly"
    ;;
  resize)
    # The host grows the disk after it sees the size line; wait for the new capacity to show up.
    step "resize: waiting for a new capacity"
    tries=0
    while [ "$(cat /sys/block/vda/size)" = "$size" ] && [ $tries -lt 400 ]; do
      usleep 100000
      tries=$((tries + 1))
    done
    new=$(cat /sys/block/vda/size)
    [ "$new" != "$size" ] || fail "resize: capacity stayed at $size sectors"
    step "resize: writing past the old end"
    dd if=/pattern.bin of=/dev/vda bs=4096 count=1 oflag=seek_bytes,direct seek=$((size * 512)) conv=notrunc status=none ||
      fail "resize: write past the old end failed"
    say "PASS resize size=$new"
    ;;
  reconnect)
    # O_DIRECT write + read-back rounds while the host kills (kill -9) or restarts (SIGTERM) the back-end under
    # the guest. Every round writes data of its own (the round number replaces the "vublk-e2e" tag of each
    # 32-byte line), so a lost or stale write shows as a mismatch. ROUND/PROGRESS lines let the host time its
    # kills and see progress after each restart; any I/O error or mismatch fails the run.
    rounds=$(param vublk.rounds)
    rounds=${rounds:-12}
    round=0
    while [ $round -lt "$rounds" ]; do
      tag=$(printf 'r%08d' "$round")
      head -c 2097152 /pattern.bin | sed "s/^vublk-e2e/$tag/" >/tmp/round
      want=$(md5sum /tmp/round | cut -d' ' -f1)
      at=$((offset + (round % 4) * 2097152))
      say "ROUND $round writing"
      step "reconnect: round $round writing"
      # Four writers at once, so the back-end has several requests in flight when it dies.
      pids=""
      for part in 0 1 2 3; do
        dd if=/tmp/round of=/dev/vda bs=64K skip=$((part * 8)) count=8 oflag=seek_bytes,direct \
          seek=$((at + part * 524288)) conv=notrunc status=none &
        pids="$pids $!"
      done
      for pid in $pids; do
        wait "$pid" || fail "reconnect: round $round: write I/O error"
      done
      step "reconnect: round $round reading back"
      dd if=/dev/vda of=/tmp/back bs=64K iflag=skip_bytes,count_bytes,direct skip="$at" count=2097152 status=none ||
        fail "reconnect: round $round: read I/O error"
      got=$(md5sum /tmp/back | cut -d' ' -f1)
      [ "$got" = "$want" ] || fail "reconnect: round $round mismatch md5=$got expected=$want"
      say "PROGRESS $round"
      round=$((round + 1))
    done
    dmesg | grep -qi 'I/O error' && fail "reconnect: the kernel logged an I/O error: $(dmesg | grep -i 'I/O error' | tail -n 1)"
    say "PASS reconnect rounds=$round"
    ;;
  migrate)
    # Runs until the host stops the VM (live-migration test): each round, 4 writers put the round's pattern
    # on their own region with O_DIRECT and read it back with O_DIRECT in one read, then compare. Patterns
    # alternate between rounds, so a read buffer the destination got stale (a dirty-log bit missing) fails.
    [ -n "$offset" ] || fail "migrate: vublk.offset missing"
    [ $((offset + 6 * length)) -le $((size * 512)) ] || fail "migrate: disk too small ($size sectors)"
    tr 'a-z' 'A-Z' </pattern.bin >/tmp/pattern.upper
    upper=$(md5sum /tmp/pattern.upper | cut -d' ' -f1)
    # For a mismatch: which 256 KiB pieces of a read held this round's pattern (U or L), the other round's (u
    # or l: the write was lost), zeroes (0: the device's data never reached this memory) or anything else (?);
    # once for the read that failed, once for a second read of the same region right after.
    piece=262144
    [ $((length % piece)) = 0 ] || piece=$length
    zero_md5=$(dd if=/dev/zero bs=$piece count=1 status=none | md5sum | cut -c1-8)
    lower_md5s=""
    upper_md5s=""
    i=0
    while [ $i -lt $((length / piece)) ]; do
      lower_md5s="$lower_md5s $(dd if=/pattern.bin bs=$piece skip=$i count=1 status=none | md5sum | cut -c1-8)"
      upper_md5s="$upper_md5s $(dd if=/tmp/pattern.upper bs=$piece skip=$i count=1 status=none | md5sum | cut -c1-8)"
      i=$((i + 1))
    done
    piece_map() { # FILE IS_UPPER: one letter per piece, the expected pattern in capitals
      i=0
      map=""
      for l in $lower_md5s; do
        u=$(echo $upper_md5s | cut -d' ' -f$((i + 1)))
        g=$(dd if="$1" bs=$piece skip=$i count=1 status=none | md5sum | cut -c1-8)
        if [ "$g" = "$u" ]; then [ "$2" = 1 ] && map="${map}U" || map="${map}u"
        elif [ "$g" = "$l" ]; then [ "$2" = 1 ] && map="${map}l" || map="${map}L"
        elif [ "$g" = "$zero_md5" ]; then map="${map}0"
        else map="${map}?"
        fi
        i=$((i + 1))
      done
      echo "$map"
    }
    # Sentinel, driven by the host through the console, for pages only the device writes after pre-copy
    # sent them. A dd holds one O_DIRECT buffer for its whole life: it reads block A (before the migration)
    # and blocks writing it into a FIFO nobody reads. "fill N" (sent during pre-copy) drains block A, so dd
    # reads block S into the same, long-clean buffer and blocks again; "check N" (sent on the destination)
    # drains block S from that buffer. Without a dirty-log bit the destination still holds block A there.
    # A steady memory dirtier keeps pre-copy from converging on its own while the host holds it open
    # (QEMU switches over as soon as what is left to send fits the downtime limit).
    ( while :; do dd if=/dev/zero of=/tmp/dirty bs=64K count=64 conv=notrunc status=none; done ) &
    block_a=$((offset + 4 * length))
    for region in "$block_a /tmp/pattern.upper" "$((block_a + length)) /pattern.bin"; do
      set -- $region
      dd if="$2" of=/dev/vda bs=1M oflag=seek_bytes,direct seek="$1" conv=fsync,notrunc status=none ||
        fail "migrate: sentinel write failed"
    done
    (
      arm() {
        rm -f /tmp/sentinel.fifo
        mkfifo /tmp/sentinel.fifo
        dd if=/dev/vda of=/tmp/sentinel.fifo bs="$length" count=2 iflag=skip_bytes,direct skip=$block_a status=none &
        holder=$!
        exec 3</tmp/sentinel.fifo
      }
      # Bytes the holder has read so far (both blocks read = block S is in its buffer).
      holder_read() { sed -n 's/^rchar: //p' /proc/$holder/io 2>/dev/null || echo 0; }
      arm
      while read -r command n; do
        case $command in
          fill)
            dd of=/dev/null bs=65536 count="$length" iflag=fullblock,count_bytes status=none <&3 ||
              say "FAIL migrate sentinel drain error $n"
            tries=0
            while [ "$(holder_read)" -lt $((2 * length)) ] && [ $tries -lt 300 ]; do
              usleep 100000
              tries=$((tries + 1))
            done
            say "filled $n read=$(holder_read)"
            ;;
          check)
            got=$(dd bs=65536 iflag=fullblock status=none <&3 | md5sum | cut -d' ' -f1)
            if [ "$got" = "$expected" ]; then say "sentinel $n ok"; else say "FAIL migrate sentinel $n md5=$got expected=$expected"; fi
            wait $holder
            exec 3<&-
            arm
            ;;
        esac
      done </dev/console
    ) &
    round=0
    while :; do
      round=$((round + 1))
      if [ $((round % 2)) = 0 ]; then src=/pattern.bin want=$expected; else src=/tmp/pattern.upper want=$upper; fi
      step "migrate: round $round"
      pids=""
      for w in 0 1 2 3; do
        (
          at=$((offset + w * length))
          dd if=$src of=/dev/vda bs=1M oflag=seek_bytes,direct seek=$at conv=notrunc status=none ||
            { say "FAIL migrate write error round=$round writer=$w"; exit 1; }
          dd if=/dev/vda of=/tmp/read$w bs="$length" count=1 iflag=skip_bytes,direct skip=$at status=none ||
            { say "FAIL migrate read error round=$round writer=$w"; exit 1; }
          got=$(md5sum /tmp/read$w | cut -d' ' -f1)
          [ "$got" = "$want" ] || {
            # Read the region again: if the device now returns the right data, it was lost on the way into
            # this memory (a dirty-log bit, or the destination's write); if not, the storage returned it.
            dd if=/dev/vda of=/tmp/reread$w bs="$length" count=1 iflag=skip_bytes,direct skip=$at status=none || echo >/tmp/reread$w
            say "FAIL migrate mismatch round=$round writer=$w md5=$got expected=$want pieces=$(piece_map /tmp/read$w $((round % 2))) reread=$(piece_map /tmp/reread$w $((round % 2)))"
            exit 1
          }
        ) &
        pids="$pids $!"
      done
      for pid in $pids; do wait "$pid" || fail "migrate round $round"; done
      say "round=$round ok"
    done
    ;;
  *) fail "unknown workload '$workload'" ;;
esac
poweroff -f
INIT
chmod 755 "$root/init"

tmp_initrd=$out/initramfs.cpio.gz.tmp
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --reproducible --quiet) |
  gzip -9n >"$tmp_initrd"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
cp "$root/pattern.bin" "$out/pattern.bin.tmp"
mv "$tmp_initrd" "$out/initramfs.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/pattern.bin.tmp" "$out/pattern.bin"
echo "$kver" >"$out/kernel-version"
echo "$want_stamp" >"$stamp"
echo "guest built in $out ($(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs)"
