#!/bin/busybox sh
# PID 1 of the QEMU test guest (built into the initramfs by guest.py).
#
# Stage 1 (initramfs): load the virtio/9p/overlay modules listed in
# /modules/load.list, mount the host's / (9p tag "hostroot", read-only) under
# an overlay with a tmpfs upper, and switch_root into it.
# Stage 2 (PID 1 in the overlay root): mount the API file systems, create the
# static nodes of modules.devname, mount the control share (tag "vmctl") and
# the extra read-write shares it lists, bring the CPUs the kernel did not boot
# online, run the control share's cmd.sh with
# stdout/stderr on the virtio-serial ports "stdout"/"stderr", write the exit
# status to the control share, power off.  The command is started by the
# host's /bin/sh, not busybox: busybox's sh runs its own applets in preference
# to the host's tools.
#
# Any failure powers the guest off without a status file: the host then
# reports the console tail (this script logs to the console).

BB=/bin/busybox
P9OPTS=trans=virtio,version=9p2000.L,msize=512000

log() { echo "vmguest: $*" >/dev/console 2>/dev/null || echo "vmguest: $*"; }
die() {
    log "FATAL: $*"
    $BB sync
    $BB poweroff -f
    exit 1
}

stage1() {
    $BB mkdir -p /proc /sys /dev /host /rw /newroot
    $BB mount -t proc proc /proc || die "mount /proc"
    $BB mount -t sysfs sysfs /sys || die "mount /sys"
    $BB mount -t devtmpfs devtmpfs /dev 2>/dev/null
    while read -r mod; do
        [ -n "$mod" ] || continue
        $BB insmod "/modules/$mod" || die "insmod $mod"
    done </modules/load.list
    $BB mount -t 9p -o "ro,cache=loose,$P9OPTS" hostroot /host ||
        die "mount of the host root (9p tag hostroot)"
    $BB mount -t tmpfs -o mode=0755 tmpfs /rw || die "mount tmpfs /rw"
    $BB mkdir -p /rw/upper /rw/work
    $BB mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work \
        overlay /newroot || die "mount overlay"
    $BB mkdir -p /newroot/.vmguest/ctl
    $BB cp /bin/busybox /init /newroot/.vmguest/ || die "copy busybox"
    $BB umount /proc /sys
    $BB umount /dev 2>/dev/null
    exec $BB switch_root /newroot /.vmguest/busybox sh /.vmguest/init stage2
    die "switch_root"
}

stage2() {
    BB=/.vmguest/busybox
    $BB mount -t proc proc /proc || die "mount /proc"
    $BB mount -t sysfs sysfs /sys || die "mount /sys"
    $BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || log "no cgroup2"
    $BB mount -t devtmpfs -o mode=0755 devtmpfs /dev || die "mount /dev"
    $BB mkdir -p /dev/pts /dev/shm
    $BB mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
    [ -e /dev/ptmx ] || $BB ln -s pts/ptmx /dev/ptmx
    $BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    [ -e /dev/fd ] || $BB ln -s /proc/self/fd /dev/fd
    [ -e /dev/stdin ] || $BB ln -s /proc/self/fd/0 /dev/stdin
    [ -e /dev/stdout ] || $BB ln -s /proc/self/fd/1 /dev/stdout
    [ -e /dev/stderr ] || $BB ln -s /proc/self/fd/2 /dev/stderr
    $BB mount -t tmpfs -o mode=1777 tmpfs /tmp || die "mount /tmp"
    $BB mount -t tmpfs -o mode=0755 tmpfs /run || die "mount /run"
    $BB mkdir -p /run/lock /run/shm
    $BB mount -t 9p -o "$P9OPTS" vmctl /.vmguest/ctl || die "mount the control share"

    # Static device nodes for on-demand module loading (what systemd's
    # kmod-static-nodes does): lines "module name c|b major:minor".
    kver=$($BB uname -r)
    if [ -r "/lib/modules/$kver/modules.devname" ]; then
        while read -r _mod name spec; do
            case "$_mod" in '#'* | '') continue ;; esac
            type=${spec%%[0-9]*}
            nums=${spec#"$type"}
            [ -e "/dev/$name" ] && continue
            $BB mkdir -p "/dev/$($BB dirname "$name")"
            $BB mknod -m 0600 "/dev/$name" "$type" "${nums%%:*}" "${nums#*:}"
        done <"/lib/modules/$kver/modules.devname"
    fi

    $BB hostname vmguest
    $BB ip link set lo up 2>/dev/null

    # Extra read-write shares: lines "tag path", shortest path first.
    if [ -r /.vmguest/ctl/shares ]; then
        while read -r tag path; do
            [ -n "$tag" ] || continue
            $BB mkdir -p "$path" || die "mkdir $path"
            $BB mount -t 9p -o "cache=mmap,$P9OPTS" "$tag" "$path" ||
                die "mount of share $tag at $path"
        done </.vmguest/ctl/shares
    fi

    # The kernel booted one CPU (maxcpus=1, guest.py KERNEL_COMMAND_LINE): every initcall
    # flipped its static keys while no other vCPU ran. The others come online now, before
    # the command, which gets them all.
    for online in /sys/devices/system/cpu/cpu[0-9]*/online; do
        [ -r "$online" ] || continue
        [ "$($BB cat "$online")" = 1 ] && continue
        echo 1 >"$online" || die "bring ${online%/online} online"
    done
    log "CPUs online: $($BB cat /sys/devices/system/cpu/online)"

    # The virtio-serial ports appear asynchronously after the driver binds.
    out=
    err=
    tries=0
    while [ -z "$out" ] || [ -z "$err" ]; do
        for d in /sys/class/virtio-ports/*; do
            [ -r "$d/name" ] || continue
            case "$($BB cat "$d/name")" in
            stdout) out=/dev/${d##*/} ;;
            stderr) err=/dev/${d##*/} ;;
            esac
        done
        [ -n "$out" ] && [ -n "$err" ] && break
        tries=$((tries + 1))
        [ "$tries" -le 500 ] || die "virtio-serial ports stdout/stderr not found"
        $BB usleep 20000
    done

    cd /
    $BB env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 \
        /bin/sh /.vmguest/ctl/cmd.sh </dev/null >"$out" 2>"$err"
    rc=$?
    $BB sync
    echo "$rc" >/.vmguest/ctl/status.part && $BB mv /.vmguest/ctl/status.part /.vmguest/ctl/status
    $BB sync
    $BB poweroff -f
}

case "$1" in
stage2) stage2 ;;
*) stage1 ;;
esac
die "init fell through"
