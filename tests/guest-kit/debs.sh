# Shell helpers (sourced, not run) shared by tests/guest-kit/build.sh and
# tests/testhost/build.sh: fetch Debian packages and unpack them without root
# (apt-get download + dpkg-deb -x), and copy an ELF program's shared libraries.
# The caller sets REPO (repository root) and has `set -eu`.

DEB_CACHE="$REPO/target/debs"          # downloaded .debs, kept between runs
DEB_XDIR="$DEB_CACHE/x"                # one unpacked tree per .deb, kept too

die() { echo "error: $*" >&2; exit 1; }

# Make sure apt knows the bookworm packages. Without package lists
# `apt-get download` cannot work; only root may refresh them.
deb_check_lists() {
    if apt-cache show --no-all-versions busybox-static >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = 0 ]; then
        echo "apt package lists missing: running apt-get update" >&2
        apt-get update >&2 || die "apt-get update failed"
    else
        die "apt does not know package busybox-static; run 'apt-get update' as root first"
    fi
}

# apt-get download as root warns that the _apt sandbox user cannot write
# here; downloading as root into our own cache is what we want.
_apt_opts() {
    if [ "$(id -u)" = 0 ]; then echo "-o APT::Sandbox::User=root"; fi
}

# deb_libclosure PKG...: PKG plus every library package it needs, recursively
# (Depends only). Non-library dependencies (python3, perl, adduser, ...) are
# dropped: we only need the shared objects an ELF program loads; whether they
# are all there is verified afterwards with the loader's --list.
deb_libclosure() {
    {
        for p in "$@"; do echo "$p"; done
        apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances "$@" | grep -v '^ ' \
            | grep -E '^(lib|zlib1g$|gcc-[0-9]+-base$)' \
            | grep -v -E -- '-perl$|^libperl|^libpython|-(common|data|bin|dev)$|^libpam-'
    } | sort -u
}

# deb_resolve PKG...: set DEB_FILES to the .deb file names apt would download
# for PKG... (name_version_arch.deb, one per line, sorted). They carry the
# exact versions, so they make the cache keys. Downloads nothing.
deb_resolve() {
    # Pin each package to the newest version a repository offers (apt-cache
    # madison lists repository versions only, newest first). Plain
    # `apt-get download PKG` would pick the candidate, which can be an
    # installed version that no repository serves any more.
    pins=$(apt-cache madison "$@" 2>/dev/null | awk -F' [|] ' \
        '$3 ~ /Packages/ { gsub(/ /, "", $1); gsub(/ /, "", $2); if (!seen[$1]++) print $1 "=" $2 }')
    # shellcheck disable=SC2046,SC2086
    DEB_FILES=$(apt-get download $(_apt_opts) --print-uris $pins 2>/dev/null \
        | awk '{print $2}' | sort) || true
    # --print-uris silently skips what it cannot fetch: check the count.
    [ "$(printf '%s\n' "$DEB_FILES" | grep -c .)" = "$#" ] \
        || die "apt cannot download all of: $* (is 'apt-get update' needed?)"
    DEB_PINS=$pins
}

# deb_fetch: download the files of the last deb_resolve that are not cached
# yet, then unpack each .deb once into $DEB_XDIR/<file stem>/.
deb_fetch() {
    mkdir -p "$DEB_CACHE" "$DEB_XDIR"
    need=""
    for f in $DEB_FILES; do
        [ -s "$DEB_CACHE/$f" ] || need="$need $(printf '%s\n' "$DEB_PINS" | grep "^${f%%_*}=")"
    done
    if [ -n "$need" ]; then
        echo "downloading:$need" >&2
        # shellcheck disable=SC2046,SC2086
        (cd "$DEB_CACHE" && apt-get download $(_apt_opts) $need >/dev/null) \
            || die "apt-get download failed for:$need"
    fi
    for f in $DEB_FILES; do
        [ -s "$DEB_CACHE/$f" ] || die "download of $f did not produce the file (version changed? run apt-get update)"
        x="$DEB_XDIR/${f%.deb}"
        if [ ! -e "$x/.unpacked" ]; then
            rm -rf "$x" && mkdir -p "$x"
            dpkg-deb -x "$DEB_CACHE/$f" "$x" || die "cannot unpack $f"
            touch "$x/.unpacked"
        fi
    done
}

# deb_dir PKG: the unpacked tree of PKG (one of the last deb_resolve).
deb_dir() {
    f=$(printf '%s\n' "$DEB_FILES" | grep "^$1_") || die "package $1 not resolved"
    echo "$DEB_XDIR/${f%.deb}"
}

# deb_libpath PKG...: colon-separated list of every directory holding shared
# objects in the unpacked trees of PKG... (for ld.so --library-path).
deb_libpath() {
    for p in "$@"; do
        find "$(deb_dir "$p")" -name '*.so*' \( -type f -o -type l \) -printf '%h\n'
    done | sort -u | paste -sd: -
}

# copy_libs DESTLIBDIR LISTER ELF...: copy (dereferenced) every shared library
# that LISTER reports for each ELF into DESTLIBDIR, named by its soname.
# LISTER is a command that prints ldd-style lines for one ELF argument
# (`ldd`, or an unpacked ld.so with --library-path ... --list). Fails if a
# library is "not found". The dynamic loader itself is skipped here (lines
# without "=>"): callers place it at the program's PT_INTERP path.
copy_libs() {
    dest=$1 lister=$2; shift 2
    mkdir -p "$dest"
    for elf in "$@"; do
        out=$($lister "$elf" 2>&1) || die "cannot list libraries of $elf: $out"
        if printf '%s\n' "$out" | grep -q 'not found'; then
            die "libraries missing for $elf:
$(printf '%s\n' "$out" | grep 'not found')"
        fi
        printf '%s\n' "$out" | awk '$1 !~ /^\// && $2 == "=>" && $3 ~ /^\// {print $1, $3}' |
        while read -r soname path; do
            cp -L "$path" "$dest/$soname"
        done
    done
}

# elf_interp ELF: the program interpreter (PT_INTERP) of ELF, or nothing for
# a static program.
elf_interp() {
    LC_ALL=C readelf -lW "$1" 2>/dev/null \
        | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p'
}
