#!/bin/bash
# Builds the Debian image the VM tests boot under qemu: Debian 12 (bookworm) or 13 (trixie).
#
# Usage: build-image.sh SUITE OUTDIR   (as root; vm.py calls it with a temporary OUTDIR it
#                                       renames; SUITE is bookworm or trixie)
#
# Writes into OUTDIR:
#   disk.qcow2           ext4 root file system, no partition table (root=/dev/vda), 4 GiB virtual
#   vmlinuz, initrd.img  Debian's kernel and a small initramfs, booted with qemu -kernel/-initrd
#   kernel-release       `uname -r` of that kernel
#   packages.installed   every Debian package in the image with its version
#
# The guest boots straight into multi-user.target, where vm-test.service (guest/) mounts the
# host's 9p share on /mnt/share, runs its run.sh and powers off. Boot speed matters because the
# tests run under TCG (no usable KVM): the initramfs holds only the virtio, ext4 and 9p modules
# (Debian's default MODULES=most initramfs doubles the boot time), no fsck at boot, timers and
# gettys masked, nginx not started at boot.
#
# This file, packages.txt, guest/ and the suite are hashed into the cache key (vm.py:
# image_key): edit any of them and the next run rebuilds that suite's image.
set -euo pipefail

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

[ $# -eq 2 ] || die "usage: build-image.sh SUITE OUTDIR (SUITE: bookworm or trixie)"
case $1 in
bookworm | trixie) ;;
*) die "unknown suite '$1': the VM tests know bookworm (Debian 12) and trixie (Debian 13)" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
for tool in debootstrap mkfs.ext4 qemu-img chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap e2fsprogs qemu-utils)"
done

here=$(cd "$(dirname "$0")" && pwd)
suite=$1
out=$2
mirror=${TRADEBALANCER_VM_MIRROR:-http://deb.debian.org/debian}
# Room for what a test installs (a .deb, a venv); the qcow2 stores only the blocks in use.
disk_size=4G

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
root=$work/root

cleanup() {
    # Never leave a mount behind under the cache directory, whatever failed.
    for fs in dev/pts dev proc sys; do
        if mountpoint -q "$root/$fs" 2>/dev/null; then
            umount -l "$root/$fs" || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

in_root() {
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

# A line "NAME" is for every suite, "NAME [SUITE ...]" for the suites named only.
packages=$(sed -e 's/#.*//' -e 's/[][]/ /g' "$here/packages.txt" |
    awk -v suite="$suite" 'NF == 1 { print $1; next } NF > 1 {
        for (i = 2; i <= NF; i++) if ($i == suite) { print $1; next } }' | paste -sd, -)
[ -n "$packages" ] || die "packages.txt lists no package for $suite"

echo "== debootstrap $suite from $mirror"
# INITRD=No: the kernel hook skips building Debian's own initramfs, which is never booted.
INITRD=No debootstrap --variant=minbase --components=main --include="$packages" \
    "$suite" "$root" "$mirror"

echo "== configure the guest"
echo tradebalancer-vm >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	tradebalancer-vm
::1		localhost ip6-localhost ip6-loopback
EOF
# Pass 0: fsck of a fresh snapshot of a clean image is wasted time under TCG.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 0' >"$root/etc/fstab"
# systemd-resolved is not in systemd's package since bookworm: point at qemu's user-net DNS.
echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
# A fixed machine-id: an empty one makes every -snapshot boot a "first boot".
in_root systemd-machine-id-setup >/dev/null
mkdir -p "$root/etc/systemd/journald.conf.d"
cat >"$root/etc/systemd/journald.conf.d/volatile.conf" <<'EOF'
[Journal]
Storage=volatile
EOF

install -m 0644 "$here/guest/vm-test.service" "$root/etc/systemd/system/vm-test.service"
install -m 0755 "$here/guest/vm-test-run" "$root/usr/local/sbin/vm-test-run"
install -m 0644 "$here/guest/20-wired.network" "$root/etc/systemd/network/20-wired.network"
mkdir -p "$root/mnt/share"

in_root systemctl set-default multi-user.target
in_root systemctl enable vm-test.service systemd-networkd.service
# Tests start nginx with their own configuration; at boot it would only cost time.
in_root systemctl disable nginx.service
# trixie mounts a tmpfs on /tmp (half the guest's memory); bookworm keeps /tmp on the disk.
# The disk for both: a test unpacks packages and venvs there, and the guest has 2 GiB.
in_root systemctl mask tmp.mount
# Nothing here is useful in a guest that lives for one test: periodic jobs, login prompts.
in_root systemctl mask \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer logrotate.timer man-db.timer \
    getty@tty1.service serial-getty@ttyS0.service systemd-timesyncd.service
# Nobody logs in: logind costs 1-4 s of boot under TCG and systemctl does not need it.
in_root systemctl mask systemd-logind.service
# Kernel modules loaded at boot "just in case" (3 s under TCG); each loads on demand if used.
in_root systemctl mask \
    modprobe@configfs.service modprobe@dm_mod.service modprobe@drm.service \
    modprobe@efi_pstore.service modprobe@fuse.service modprobe@loop.service \
    sys-kernel-config.mount sys-fs-fuse-connections.mount \
    systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
# Generators for what this guest never has (encrypted or GPT-discovered disks, hibernation,
# SysV init scripts, gettys); each is a process started at every boot. Kept: fstab, debug.
mkdir -p "$root/etc/systemd/system-generators"
for generator in cryptsetup getty gpt-auto hibernate-resume integritysetup rc-local run \
    system-update sysv veritysetup; do
    ln -sf /dev/null "$root/etc/systemd/system-generators/systemd-$generator-generator"
done
install -m 0644 "$here/guest/modprobe-blacklist.conf" "$root/etc/modprobe.d/vm-test.conf"
# The share is mounted by vm-test.service at the very end of the boot; loading the 9p modules
# early overlaps their 1-2 s with the rest of the boot.
printf '9p\n9pnet_virtio\n' >"$root/etc/modules-load.d/vm-test-9p.conf"

echo "== initramfs: busybox, the virtio and ext4 modules, nothing else"
kver=$(basename "$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort -V | tail -n 1)")
[ -n "$kver" ] || die "no kernel in the image"
# Debian's initramfs starts udev and waits for it to settle: 5 s of a 30 s boot under TCG.
# This one loads three modules (and their dependencies) in order and switches root.
initramfs=$root/tmp/initramfs
mkdir -p "$initramfs"/bin "$initramfs"/dev "$initramfs"/proc "$initramfs"/newroot \
    "$initramfs"/lib/modules
cp "$root/bin/busybox" "$initramfs/bin/busybox"
install -m 0755 "$here/guest/initramfs-init" "$initramfs/init"
mknod -m 0600 "$initramfs/dev/console" c 5 1
in_root modprobe --all --show-depends --set-version "$kver" virtio_pci virtio_blk ext4 |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$work/modules"
[ -s "$work/modules" ] || die "modprobe found no module to put in the initramfs"
# trixie's kernel ships its modules xz-compressed, which busybox's insmod cannot load: they
# go into the initramfs uncompressed (bookworm's are already).
while read -r module; do
    name=$(basename "$module")
    case $name in
    *.ko) plain=$name && cat "$root$module" ;;
    *.ko.xz) plain=${name%.xz} && xz -dc "$root$module" ;;
    *.ko.zst) plain=${name%.zst} && zstd -q -dc "$root$module" ;;
    *) die "$module: compressed in a way this script does not know (not .ko, .ko.xz, .ko.zst)" ;;
    esac >"$work/module" || die "cannot unpack $module (apt-get install xz-utils zstd)"
    mv "$work/module" "$initramfs/lib/modules/$plain"
    echo "$plain" >>"$initramfs/modules"
done <"$work/modules"
# Uncompressed: the kernel unpacks it faster than it would inflate it under TCG.
in_root sh -c 'cd /tmp/initramfs && find . | cpio --quiet -o -H newc -R 0:0' >"$out/initrd.img"
rm -rf "$initramfs"

echo "== trim"
in_root apt-get clean
# Debian's own initramfs is never booted (see above).
rm -f "$root"/boot/initrd.img-*
# Drivers for hardware a qemu guest never has (130 MB of 390 MB of modules), and documentation.
for dir in drivers/gpu drivers/media drivers/infiniband drivers/iio drivers/net/wireless sound; do
    rm -rf "$root/lib/modules/$kver/kernel/$dir"
done
in_root depmod "$kver"
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log

echo "== disk image"
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kver" >"$out/kernel-release"
in_root dpkg-query -W -f '${Package} ${Version}\n' >"$out/packages.installed"
truncate -s "$disk_size" "$work/disk.raw"
mkfs.ext4 -q -F -L tbroot -d "$root" "$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$out/disk.qcow2"
echo "== done: $out ($(du -sh "$out/disk.qcow2" | cut -f1) disk, kernel $kver)"
