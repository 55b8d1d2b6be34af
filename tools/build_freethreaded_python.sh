#!/usr/bin/env bash
# Build a free-threaded CPython 3.13 ("3.13t") with pyenv, offline but for Debian's archive, and
# print the path of its python3.13t. `nox -s tests_freethreaded` runs this when it finds no
# free-threaded interpreter; a build already in pyenv's versions folder is reused (printed at once).
#
# Why this way: python.org and prebuilt interpreters cannot be downloaded on the project's
# machines, but Debian's package archive can be reached. Debian's source package of CPython 3.13
# (Debian 13, "trixie") ships the very tarball python.org publishes (its .orig.tar.xz has the same
# SHA-256 that pyenv's build definition checks), so the script:
#   1. installs the build dependencies with apt-get if any is missing (so ssl, ctypes, sqlite3,
#      lzma, bz2, readline, curses, dbm, uuid are all built);
#   2. downloads the source package with apt-get, through a private sources list and private
#      state and cache folders in a temporary folder: the machine's own apt configuration and
#      lists are never changed;
#   3. puts the tarball in pyenv's cache as Python-X.Y.Z.tar.xz, after checking its SHA-256
#      against pyenv's definition of X.Y.Z, and runs `pyenv install X.Y.Zt` (no download).
#
# Needs: root (or sudo-less apt-get rights), pyenv (PYENV_ROOT, else ~/.pyenv), a Debian mirror
# in the machine's apt sources (or ANYFORK_DEBIAN_MIRROR=<mirror URL>). Takes ~4 minutes on 2
# cores. Everything but the last line of output goes to stderr.
set -euo pipefail

say() { echo "build_freethreaded_python: $*" >&2; }
die() { say "error: $*"; exit 1; }

PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"
export PYENV_ROOT
pyenv_bin="$PYENV_ROOT/bin/pyenv"
[ -x "$pyenv_bin" ] || pyenv_bin="$(command -v pyenv || true)"
[ -n "$pyenv_bin" ] || die "pyenv is not installed (looked in $PYENV_ROOT/bin and on PATH)"
definitions="$PYENV_ROOT/plugins/python-build/share/python-build"

# 0. A free-threaded 3.13 built before: reuse it.
for existing in $(ls -d "$PYENV_ROOT"/versions/3.13.*t 2>/dev/null | sort -V -r); do
    if [ -x "$existing/bin/python3.13t" ]; then
        say "reusing $existing"
        echo "$existing/bin/python3.13t"
        exit 0
    fi
done

# 1. Build dependencies (Debian names), installed only where missing.
build_deps=(
    build-essential pkg-config xz-utils
    libssl-dev zlib1g-dev libffi-dev libsqlite3-dev libbz2-dev liblzma-dev
    libreadline-dev libncurses-dev libgdbm-dev uuid-dev
)
missing=()
for package in "${build_deps[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
fi

# 2. The source package, from trixie, through a private apt configuration.
mirror="${ANYFORK_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    # The machine's own Debian mirror: the first URI of its sources that serves the main
    # archive (not the security one), in deb822 (.sources) or one-line (sources.list) form.
    mirror="$(
        {
            cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' \
                | tr ' ' '\n'
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
                | sed -n 's/^deb\(-src\)\?[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\3/p'
        } | grep -E '/debian/?$' | head -n 1 || true
    )"
fi
[ -n "$mirror" ] || die "no Debian mirror in /etc/apt: set ANYFORK_DEBIAN_MIRROR to one"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring is missing: apt-get install debian-archive-keyring"

work="$(mktemp -d -t anyfork-freethreaded.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/source"
echo "deb-src [signed-by=$keyring] $mirror trixie main" >"$work/sources.list"
apt_private=(
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
)
say "downloading CPython 3.13's source package from Debian trixie ($mirror)"
apt-get "${apt_private[@]}" update -qq >&2
(cd "$work/source" && apt-get "${apt_private[@]}" source --download-only -qq python3.13 >&2)
tarball="$(ls "$work"/source/python3.13_3.13.*.orig.tar.xz 2>/dev/null | head -n 1)"
[ -n "$tarball" ] || die "the source package held no python3.13_*.orig.tar.xz"
version="$(basename "$tarball" | sed -n 's/^python3\.13_\(3\.13\.[0-9]\+\)\.orig\.tar\.xz$/\1/p')"
[ -n "$version" ] || die "cannot read a CPython version from $(basename "$tarball")"

# 3. Into pyenv's cache, checked against pyenv's own checksum, then build X.Y.Zt.
[ -f "$definitions/${version}t" ] || die "pyenv knows no ${version}t: update pyenv"
expected="$(grep -o "Python-$version\.tar\.xz#[0-9a-f]\{64\}" "$definitions/$version" \
    | head -n 1 | cut -d '#' -f 2)"
actual="$(sha256sum "$tarball" | cut -d ' ' -f 1)"
[ -n "$expected" ] || die "pyenv's definition of $version names no Python-$version.tar.xz"
[ "$expected" = "$actual" ] \
    || die "Debian's tarball of $version (sha256 $actual) is not python.org's ($expected)"
mkdir -p "$PYENV_ROOT/cache"
cp "$tarball" "$PYENV_ROOT/cache/Python-$version.tar.xz"
say "building CPython ${version}t with pyenv (a few minutes)"
MAKE_OPTS="${MAKE_OPTS:--j$(nproc)}" "$pyenv_bin" install --skip-existing "${version}t" >&2
python="$PYENV_ROOT/versions/${version}t/bin/python3.13t"
[ -x "$python" ] || die "pyenv built ${version}t but $python is missing"
# Free-threaded, and with the modules the tests (and users) need.
PYTHON_GIL=0 "$python" -c '
import sys, sysconfig
assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1, "not a free-threaded build"
assert not sys._is_gil_enabled(), "the GIL is on"
import bz2, ctypes, lzma, readline, sqlite3, ssl, uuid, zlib
' >&2 || die "$python is not a complete free-threaded build"
echo "$python"
