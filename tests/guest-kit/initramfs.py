#!/usr/bin/env python3
"""Helpers for building initramfs images without root (used by tests/guest-kit
and tests/testhost).

Subcommands:
  kmods --kdir DIR --dest ROOT [--optional NAME]... NAME...
      Resolve kernel modules NAME (and every dependency: modinfo "depends=" and
      "softdep= pre:" entries) inside the extracted kernel tree DIR
      (DIR/lib/modules/<ver>/...). Modules built into the kernel
      (modules.builtin) are skipped and reported. Copies the .ko files to
      ROOT/lib/modules/<ver>/..., writes a modules.dep for them, and writes
      ROOT/etc/modules.load: the load order (dependencies first), one path
      relative to /lib/modules/<ver> per line. Prints a report to stderr.
      We parse .modinfo ourselves because Debian's linux-image package ships no
      modules.dep (depmod runs at install time) and depmod needs kmod installed.

  cpio --root DIR [--dev PATH:c|b:MAJOR:MINOR]... --out FILE.gz
      Pack DIR as a gzip-compressed newc cpio archive. Every entry is owned by
      root (uid/gid 0) and has mtime 0, so the archive is reproducible and no
      root privileges are needed to create device nodes (they are only
      headers in the archive; the kernel creates them when it unpacks).
"""
import argparse
import gzip
import os
import shutil
import stat
import struct
import sys


# ---------------------------------------------------------------- modules

def modinfo(path):
    """Return the list of key=value strings of an ELF64 module's .modinfo."""
    with open(path, 'rb') as f:
        data = f.read()
    if data[:4] != b'\x7fELF' or data[4] != 2:
        raise SystemExit(f'initramfs.py: {path}: not an ELF64 kernel module '
                         '(compressed modules are not supported)')
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    def sh(i):
        off = shoff + i * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from('<IIQQQQ', data, off)
        return name, offset, size
    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, offset, size = sh(i)
        end = data.index(b'\0', stroff + name)
        if data[stroff + name:end] == b'.modinfo':
            raw = data[offset:offset + size]
            return [s.decode('utf-8', 'replace') for s in raw.split(b'\0') if s]
    return []


def norm(name):
    # Module names treat '-' and '_' as the same character.
    return name.replace('-', '_')


def cmd_kmods(a):
    mroot = os.path.join(a.kdir, 'lib', 'modules')
    vers = sorted(os.listdir(mroot))
    if len(vers) != 1:
        raise SystemExit(f'initramfs.py: expected one kernel version in {mroot}, found {vers}')
    ver = vers[0]
    mdir = os.path.join(mroot, ver)
    files = {}   # normalized name -> path relative to mdir
    for dp, _dn, fn in os.walk(mdir):
        for f in fn:
            if f.endswith('.ko'):
                rel = os.path.relpath(os.path.join(dp, f), mdir)
                files[norm(f[:-3])] = rel
    builtin = set()
    bpath = os.path.join(mdir, 'modules.builtin')
    if os.path.exists(bpath):
        for line in open(bpath):
            line = line.strip()
            if line:
                builtin.add(norm(os.path.basename(line)[:-3]))
    info = {}
    def get_info(n):
        if n not in info:
            d = {'depends': [], 'softpre': [], 'alias': []}
            for kv in modinfo(os.path.join(mdir, files[n])):
                k, _, v = kv.partition('=')
                if k == 'depends':
                    d['depends'] += [norm(x) for x in v.split(',') if x]
                elif k == 'softdep':
                    # "pre: a b post: c" -- only "pre" modules must load first.
                    cur = None
                    for w in v.split():
                        if w.endswith(':'):
                            cur = w[:-1]
                        elif cur == 'pre':
                            d['softpre'].append(w)
            info[n] = d
        return info[n]
    alias_index = None
    def by_alias(name):
        # softdep entries may name an alias ("crc32c"), not a module.
        nonlocal alias_index
        if alias_index is None:
            alias_index = {}
            for n, rel in files.items():
                for kv in modinfo(os.path.join(mdir, rel)):
                    if kv.startswith('alias='):
                        alias_index.setdefault(kv[6:], []).append(n)
        return sorted(alias_index.get(name, []))

    order, seen, report_builtin, missing = [], set(), [], []
    def visit(name, optional, chain):
        n = norm(name)
        if n in seen:
            return
        if n in builtin:
            seen.add(n)
            report_builtin.append(n)
            return
        if n not in files:
            cands = by_alias(name) or by_alias(n)
            if cands:
                for c in cands:
                    visit(c, True, chain + [n])
                seen.add(n)
                return
            if not optional:
                missing.append(' <- '.join(chain + [n]))
            return
        seen.add(n)
        d = get_info(n)
        for dep in d['softpre']:
            visit(dep, True, chain + [n])   # soft: absence is not an error
        for dep in d['depends']:
            visit(dep, False, chain + [n])
        order.append(n)

    for n in a.names:
        visit(n, False, [])
    for n in a.optional:
        visit(n, True, [])
    if missing:
        raise SystemExit('initramfs.py: kernel modules not found (neither a .ko '
                         'nor built in): ' + ', '.join(missing))
    dest = os.path.join(a.dest, 'lib', 'modules', ver)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, 'modules.dep'), 'w') as dep:
        for n in order:
            rel = files[n]
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(os.path.join(mdir, rel), os.path.join(dest, rel))
            # modules.dep lists every (transitive) dependency, the one to
            # load last first, as depmod does; busybox modprobe relies on it.
            need, todo = set(), list(get_info(n)['depends'])
            while todo:
                x = todo.pop()
                if x in files and x not in need:
                    need.add(x)
                    todo += get_info(x)['depends']
            deps = [files[x] for x in reversed(order) if x in need]
            dep.write((f'{rel}: ' + ' '.join(deps)).rstrip() + '\n')
    for f in ('modules.builtin', 'modules.order', 'modules.builtin.modinfo'):
        if os.path.exists(os.path.join(mdir, f)):
            shutil.copyfile(os.path.join(mdir, f), os.path.join(dest, f))
    os.makedirs(os.path.join(a.dest, 'etc'), exist_ok=True)
    with open(os.path.join(a.dest, 'etc', 'modules.load'), 'w') as f:
        for n in order:
            f.write(files[n] + '\n')
    print(f'kernel {ver}: {len(order)} modules to load: {" ".join(order)}', file=sys.stderr)
    print(f'kernel {ver}: built in (skipped): {" ".join(report_builtin) or "none"}', file=sys.stderr)
    if a.report:
        with open(a.report, 'w') as f:
            f.write(f'kernel={ver}\nload={" ".join(order)}\nbuiltin={" ".join(report_builtin)}\n')


# ---------------------------------------------------------------- cpio

class Cpio:
    def __init__(self, fileobj):
        self.f = fileobj
        self.ino = 1

    def entry(self, name, mode, data=b'', rdev=(0, 0), size=None):
        name_b = name.encode() + b'\0'
        size = len(data) if size is None else size
        hdr = '070701' + ''.join('%08X' % v for v in (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, size,
            0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        self.f.write(hdr.encode() + name_b)
        self.f.write(b'\0' * ((4 - (110 + len(name_b)) % 4) % 4))
        if data:
            self.f.write(data)
            self.f.write(b'\0' * ((4 - size % 4) % 4))

    def file_from(self, name, path, mode):
        size = os.path.getsize(path)
        self.entry(name, mode, size=size)
        with open(path, 'rb') as src:
            shutil.copyfileobj(src, self.f, 1 << 20)
        self.f.write(b'\0' * ((4 - size % 4) % 4))

    def trailer(self):
        self.entry('TRAILER!!!', 0)


def cmd_cpio(a):
    devs = []
    for d in a.dev:
        path, kind, major, minor = d.split(':')
        devs.append((path.strip('/'), kind, int(major), int(minor)))
    with open(a.out, 'wb') as raw, \
            gzip.GzipFile(fileobj=raw, mode='wb', compresslevel=a.level, mtime=0) as gz:
        c = Cpio(gz)
        for dp, dn, fn in os.walk(a.root):
            dn.sort()
            rel = os.path.relpath(dp, a.root)
            if rel != '.':
                c.entry(rel, stat.S_IFDIR | 0o755)
            for name in sorted(fn + [x for x in dn if os.path.islink(os.path.join(dp, x))]):
                p = os.path.join(dp, name)
                r = os.path.normpath(os.path.join(rel, name))
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    c.entry(r, stat.S_IFLNK | 0o777, os.readlink(p).encode())
                elif stat.S_ISREG(st.st_mode):
                    c.file_from(r, p, stat.S_IFREG | (st.st_mode & 0o7777))
            # os.walk does not descend into symlinked dirs (followlinks=False)
            dn[:] = [x for x in dn if not os.path.islink(os.path.join(dp, x))]
        for path, kind, major, minor in devs:
            mode = (stat.S_IFCHR if kind == 'c' else stat.S_IFBLK) | 0o600
            c.entry(path, mode, rdev=(major, minor))
        c.trailer()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest='cmd', required=True)
    k = sub.add_parser('kmods')
    k.add_argument('--kdir', required=True)
    k.add_argument('--dest', required=True)
    k.add_argument('--optional', action='append', default=[])
    k.add_argument('--report')
    k.add_argument('names', nargs='*')
    c = sub.add_parser('cpio')
    c.add_argument('--root', required=True)
    c.add_argument('--dev', action='append', default=[])
    c.add_argument('--out', required=True)
    c.add_argument('--level', type=int, default=6)
    a = p.parse_args()
    {'kmods': cmd_kmods, 'cpio': cmd_cpio}[a.cmd](a)


if __name__ == '__main__':
    main()
