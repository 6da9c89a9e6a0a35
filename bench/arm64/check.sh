#!/usr/bin/env bash
# `make check-arm`: the wheel on an emulated arm64 Debian (the paper's Raspberry Pi), end to end.
#
# debootstrap builds a bookworm arm64 root (cached in $LABTOOLS_ARM_ROOT), qemu-user-static runs its
# binaries; the aarch64 wheels of the dependencies are downloaded here (the root needs no network), the
# labtools wheel is built from this checkout, and inside the root: a venv with `labtools[mpich]`,
# `labtools kernels build`, then `mpiexec -n 2 labtools train` twice (kernels on, kernels off) on a
# CIFAR-10 subset. bench/arm64/run.py writes bench/results/arm64.json (kernels per rank, digests, times).
# About 20 minutes from scratch (debootstrap 4, packages 9, wheels 2, training), minutes when cached.
# Needs root (debootstrap, chroot, mounts) and: apt-get install debootstrap qemu-user-static binfmt-support
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ROOT=${LABTOOLS_ARM_ROOT:-/var/tmp/labtools-arm64}
WHEELS=$ROOT-wheels
PY=${PYTHON:-.venv/bin/python}
say() { echo "check-arm: $*"; }
die() { echo "check-arm: error: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and bind mounts); run it as root."
for c in debootstrap qemu-aarch64-static update-binfmts chroot; do
  command -v "$c" >/dev/null || die "$c not found: apt-get install debootstrap qemu-user-static binfmt-support"
done

# The kernel hands aarch64 executables to qemu only through binfmt_misc: mounted and registered.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "qemu-aarch64 is not registered in binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"

# 1. The root file system, once: python3-venv and g++ are unpacked and configured under emulation.
t0=$(date +%s)
if [ ! -e "$ROOT/.labtools-ready" ]; then
  say "debootstrap arm64 bookworm into $ROOT (about 13 minutes)"
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3-venv,g++,ca-certificates \
    bookworm "$ROOT" http://deb.debian.org/debian
  touch "$ROOT/.labtools-ready"
fi
t_root=$(( $(date +%s) - t0 ))
[ "${1:-}" = "--root-only" ] && { say "root ready in ${t_root}s"; exit 0; }

data=$("$PY" -m labtools data where 2>/dev/null) || die "no CIFAR-10 here (labtools data where); set CIFAR10_DIR."

# 2. Wheels: labtools from this checkout, its dependencies' aarch64 wheels (pip resolves the markers
# inside the root, against this list; nothing is fetched there).
t0=$(date +%s)
rm -f "$WHEELS"/labtools-*.whl
mkdir -p "$WHEELS"
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$REPO"
tfv=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)')
# pip matches --platform tags exactly: list every manylinux level bookworm's glibc (2.36) runs
plats=(--platform manylinux2014_aarch64); for v in 17 24 26 27 28 29 31 32 33 34 35 36; do plats+=(--platform "manylinux_2_${v}_aarch64"); done
"$PY" -m pip download -q --only-binary=:all: "${plats[@]}" \
  --python-version 3.11 --implementation cp -d "$WHEELS" \
  "tensorflow==$tfv" "mpi4py>=4" mpich numpy psutil tqdm pandas
t_wheels=$(( $(date +%s) - t0 ))

# 3. Inside the root: the venv, the kernels, two tiny trainings. CA certificates are the host's (pip
# inside would need them through this network's proxy; it runs offline here anyway).
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
IN=/mnt/labtools-check  # inside the emulated root only: where the bench folder, the wheels and CIFAR-10 are bound
mkdir -p "$ROOT$IN/repo" "$ROOT$IN/wheels" "$ROOT$IN/cifar" "$ROOT/proc" "$ROOT/dev" "$ROOT/sys"
mounts=()
bind() { mount --bind "$1" "$2"; mounts=("$2" "${mounts[@]}"); }
cleanup() { for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
mount -t proc proc "$ROOT/proc"; mounts=("$ROOT/proc" "${mounts[@]}")
bind /dev "$ROOT/dev"
bind /dev/shm "$ROOT/dev/shm"
bind /sys "$ROOT/sys"  # hwloc (MPICH) reads the CPU topology there
bind "$REPO/bench" "$ROOT$IN/repo"
bind "$WHEELS" "$ROOT$IN/wheels"
bind "$data" "$ROOT$IN/cifar"
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  T_ROOT="$t_root" T_WHEELS="$t_wheels" CIFAR10_DIR="$IN/cifar" IN="$IN" \
  /bin/bash -euo pipefail -c '
    rm -rf /opt/labtools && python3 -m venv /opt/labtools
    t0=$(date +%s)
    /opt/labtools/bin/pip install -q --no-index --find-links "$IN/wheels" "labtools[mpich]"
    export T_INSTALL=$(( $(date +%s) - t0 ))
    /opt/labtools/bin/python "$IN/repo/arm64/run.py" "$IN/repo/results/arm64.json"'
