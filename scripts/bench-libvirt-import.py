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
Each timed run starts after a sync. Prints each run, the medians, the ratio and our peak RSS.
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
            for fmt in ('qcow2', 'raw'):
                vm = 'imp{0}{1}'.format(r, fmt)
                el, rss = timed('/usr/bin/time', '-v', BIN, 'import', '-q', 'file://' + store,
                                'd/disk', 'libvirt+' + URI, '--vm', vm, '--name', 'disk',
                                '--placement', pool, '--format', fmt)
                res.setdefault(('ours', fmt), []).append(el)
                res.setdefault(('rss', fmt), []).append(rss)
                vol = 'up{0}.{1}'.format(r, fmt)
                os.sync()
                t = time.monotonic()
                bm.virsh('vol-create-as', pool, vol, '{0}G'.format(vgib), '--format', fmt)
                bm.virsh('vol-upload', '--sparse', '--pool', pool, vol, files[fmt])
                up = time.monotonic() - t
                # vol-upload returns with the data in the page cache; ours returns after an
                # fsync of the volume. The same durability: vol-upload, then `sync FILE`.
                bm.sh('sync', os.path.join(dst, vol))
                up_sync = time.monotonic() - t
                res.setdefault(('up', fmt), []).append(up)
                res.setdefault(('up_sync', fmt), []).append(up_sync)
                print('  round {0} {1:5}: ours {2:5.2f} s (RSS {3} MiB), vol-upload --sparse '
                      '{4:5.2f} s, + sync of the volume {5:5.2f} s'.format(
                          r, fmt, el, rss, up, up_sync), flush=True)
                for v in bm.virsh('vol-list', pool).split('\n'):
                    if v.strip():
                        bm.virsh('vol-delete', '--pool', pool, v.split()[0], check=False)
        for fmt in ('qcow2', 'raw'):
            o, u = statistics.median(res[('ours', fmt)]), statistics.median(res[('up', fmt)])
            us = statistics.median(res[('up_sync', fmt)])
            print('RESULT import {0}G/{1}G into a {2} volume: ours {3:.2f} s, vol-upload --sparse '
                  '{4:.2f} s (ratio {5:.2f}), vol-upload + sync of the volume {6:.2f} s (ratio '
                  '{7:.2f}), {8:.0f} MiB/s of data, peak RSS {9} MiB (medians of {10})'.format(
                      vgib, dgib, fmt, o, u, o / u, us, o / us, dgib * 1024 / o,
                      max(res[('rss', fmt)]), ROUNDS), flush=True)
    finally:
        bm.virsh('pool-destroy', pool, check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    main()
