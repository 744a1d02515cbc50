#!/usr/bin/env python3
"""libvirt import side by side with `virsh vol-upload --sparse` of the same disk (see
benches/README.md), alternating, VRG_BENCH_ROUNDS rounds (default 3):

    scripts/bench-libvirt-import.sh [VIRTUAL_GIB/DATA_GIB]      # default 4/1

The source is the whole-migration bench's qcow2 (DATA GiB of random data in 16 MiB runs over
VIRTUAL GiB). It is staged once with `virtrigaud export` as streamOptimized VMDK in a file
store (what a migration from libvirt stages), and converted once with `qemu-img` to the qcow2
and the sparse raw file that vol-upload sends. Then, per round and target format (qcow2, raw):
  * ours: `virtrigaud import STORE KEY libvirt+URI --format F` (decode the VMDK, verify the
    object SHA-256 and the content digest, write the volume);
  * vol-upload: `virsh vol-create-as` + `virsh vol-upload --sparse` of the prepared file,
    timed when it returns (its data still in the page cache) and after a `sync` of the
    volume's file (ours fsyncs the volume before it reports: the same durability).
Each timed run starts after a sync, with both inputs (the staged object, vol-upload's file) in
the same state, once each way: `cached` (just read, so in the page cache) and `evicted` (out of
it: read from the disk). Prints each run, the medians, the ratio and our peak RSS.
No assertion: figures for the README.
"""

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location('bm', os.path.join(HERE, 'bench-migration.py'))
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)

URI, BIN, ROUNDS = bm.URI, bm.BIN, bm.ROUNDS


def timed(*args):
    os.sync()
    t = time.monotonic()
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    el = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError('{0}: {1}'.format(' '.join(args[:3]), r.stderr[-2000:]))
    rss = 0
    for l in r.stderr.splitlines():
        if 'Maximum resident set size' in l:
            rss = int(l.split(':')[1]) // 1024
    return el, rss


def set_cache_state(paths, state):
    """Brings the files under paths into the page cache ('cached') or out of it ('evicted')."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        else:
            files.append(p)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if state == 'cached':
                while os.read(fd, 1 << 20):
                    pass
            else:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    vgib, dgib = 4, 1
    if len(sys.argv) > 1:
        vgib, dgib = (int(x) for x in sys.argv[1].split('/'))
    base = tempfile.mkdtemp(prefix='vrg-import-bench-', dir=os.environ.get('VRG_BENCH_DIR', '/var/tmp'))
    pool = 'vrgimp{0}'.format(os.getpid())
    try:
        src, dst = os.path.join(base, 'src.qcow2'), os.path.join(base, 'dst')
        store = os.path.join(base, 'store')
        os.makedirs(dst)
        print('== {0} GiB virtual / {1} GiB data: preparing'.format(vgib, dgib), flush=True)
        bm.make_source(src, vgib, dgib)
        bm.sh(BIN, 'export', '-q', '--format', 'vmdk', src, 'file://' + store, 'd/disk')
        files = {'qcow2': os.path.join(base, 'up.qcow2'), 'raw': os.path.join(base, 'up.raw')}
        for fmt, f in files.items():
            bm.sh('qemu-img', 'convert', '-O', fmt, src, f)
        bm.virsh('pool-create-as', pool, 'dir', '--target', dst)
        res = {}
        for r in range(ROUNDS):
            for fmt, state in [(f, c) for f in ('qcow2', 'raw') for c in ('cached', 'evicted')]:
                vm = 'imp{0}{1}{2}'.format(r, fmt, state)
                set_cache_state([store, files[fmt]], state)
                el, rss = timed('/usr/bin/time', '-v', BIN, 'import', '-q', 'file://' + store,
                                'd/disk', 'libvirt+' + URI, '--vm', vm, '--name', 'disk',
                                '--placement', pool, '--format', fmt)
                key = (fmt, state)
                res.setdefault(('ours', key), []).append(el)
                res.setdefault(('rss', key), []).append(rss)
                vol = 'up{0}{1}.{2}'.format(r, state, fmt)
                set_cache_state([store, files[fmt]], state)
                os.sync()
                t = time.monotonic()
                bm.virsh('vol-create-as', pool, vol, '{0}G'.format(vgib), '--format', fmt)
                bm.virsh('vol-upload', '--sparse', '--pool', pool, vol, files[fmt])
                up = time.monotonic() - t
                # vol-upload returns with the data in the page cache; ours returns after an
                # fsync of the volume. The same durability: vol-upload, then `sync FILE`.
                bm.sh('sync', os.path.join(dst, vol))
                up_sync = time.monotonic() - t
                res.setdefault(('up', key), []).append(up)
                res.setdefault(('up_sync', key), []).append(up_sync)
                print('  round {0} {1:5} {2:7}: ours {3:5.2f} s (RSS {4} MiB), vol-upload '
                      '--sparse {5:5.2f} s, + sync of the volume {6:5.2f} s'.format(
                          r, fmt, state, el, rss, up, up_sync), flush=True)
                for v in bm.virsh('vol-list', pool).split('\n'):
                    if v.strip():
                        bm.virsh('vol-delete', '--pool', pool, v.split()[0], check=False)
        for key in [(f, c) for f in ('qcow2', 'raw') for c in ('cached', 'evicted')]:
            o, u = statistics.median(res[('ours', key)]), statistics.median(res[('up', key)])
            us = statistics.median(res[('up_sync', key)])
            print('RESULT import {0}G/{1}G into a {2} volume, inputs {3}: ours {4:.2f} s, '
                  'vol-upload --sparse {5:.2f} s (ratio {6:.2f}), vol-upload + sync of the '
                  'volume {7:.2f} s (ratio {8:.2f}), {9:.0f} MiB/s of data, peak RSS {10} MiB '
                  '(medians of {11})'.format(
                      vgib, dgib, key[0], key[1], o, u, o / u, us, o / us, dgib * 1024 / o,
                      max(res[('rss', key)]), ROUNDS), flush=True)
    finally:
        bm.virsh('pool-destroy', pool, check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    main()
