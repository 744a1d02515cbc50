#!/usr/bin/env python3
"""A whole libvirt -> libvirt migration through a file:// store, timed side by side with the
same job done by hand the way the Go implementation did it (see benches/README.md).

    scripts/bench-migration.sh [SPEC ...]      # SPEC = VIRTUAL_GIB/DATA_GIB[xDISKS]
                                               # default: 4/1 4/1x2 10/3

Per size: a qcow2 source volume holding DATA GiB of random data spread over VIRTUAL GiB, in a
libvirt dir pool of a domain; then, alternating, ROUNDS times each:
  * ours: `virtrigaud --json migrate --from libvirt+URI --to libvirt+URI --via file://STORE`
    (export, import, verification, domain definition), phases timed from its JSON events;
  * by hand: virsh vol-download --sparse to a temp file, qemu-img convert into the store,
    sha256sum, a copy back, qemu-img convert, virsh vol-create-as + vol-upload --sparse,
    virsh define, each step timed.
Prints medians, the ratio ours/by-hand, each phase's share and ours' peak RSS (/usr/bin/time).
With xDISKS (several disks of that size in one domain) only ours runs, and its time is compared
with the one-disk run of the same size made earlier in the same invocation.
No assertion: figures are for the README's performance table.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

URI = os.environ.get('VIRTRIGAUD_LIBVIRT_URI', 'qemu:///system')
BIN = os.environ.get('VRG_BIN', 'target/release/virtrigaud')
ROUNDS = int(os.environ.get('VRG_BENCH_ROUNDS', '3'))
# VRG_BENCH_HAND=0 skips the by-hand path (ours only, for quick comparisons).
HAND = os.environ.get('VRG_BENCH_HAND', '1') != '0'
GIB = 1 << 30
CHUNK = 16 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def virsh(*args, check=True):
    r = subprocess.run(('virsh', '-q', '-c', URI) + args, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError('virsh {0}: {1}'.format(' '.join(args), r.stderr.strip()))
    return r.stdout


def make_source(path, vgib, dgib):
    """A qcow2 of vgib GiB with dgib GiB of random data in 16 MiB runs spread evenly."""
    raw = path + '.raw'
    n = dgib * GIB // CHUNK
    step = vgib * GIB // n
    with open(raw, 'wb') as f:
        f.truncate(vgib * GIB)
        for i in range(n):
            f.seek(i * step)
            f.write(os.urandom(CHUNK))
    sh('qemu-img', 'convert', '-O', 'qcow2', raw, path)
    os.remove(raw)


def domain_xml(name, disks, fmt='qcow2'):
    if isinstance(disks, str):
        disks = [disks]
    devs = ''.join("<disk type='file' device='disk'><driver name='qemu' type='{0}'/>"
                   "<source file='{1}'/><target dev='vd{2}' bus='virtio'/></disk>".format(
                       fmt, d, 'abcdefgh'[i]) for i, d in enumerate(disks))
    return ("<domain type='qemu'><name>{0}</name><memory unit='MiB'>512</memory><vcpu>2</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{1}"
            "</devices></domain>").format(name, devs)


def define(xml, work):
    p = os.path.join(work, 'dom.xml')
    with open(p, 'w') as f:
        f.write(xml)
    virsh('define', p)


def disk_io(path):
    """(bytes read, bytes written) so far by the block device holding path, or None."""
    dev = os.stat(path).st_dev
    try:
        with open('/sys/dev/block/{0}:{1}/stat'.format(os.major(dev), os.minor(dev))) as f:
            fields = f.read().split()
    except OSError:
        return None
    return int(fields[2]) * 512, int(fields[6]) * 512


def io_since(path, before):
    """GiB read and written by path's device since before, after a sync (so what the run left
    dirty counts too)."""
    os.sync()
    after = disk_io(path)
    if before is None or after is None:
        return None
    return tuple((a - b) / GIB for a, b in zip(after, before))


def device_floor(files, read_gib, write_gib, work):
    """Seconds the disk takes on its own for read_gib GiB of reads and write_gib GiB of writes
    at once, around the page cache, in 4 MiB requests as ours makes: dd readers of files
    (again and again, O_DIRECT) beside dd writers of new files (O_DIRECT, their data from the
    page cache). The floor of any job that moves those bytes through this disk."""
    procs, outs = [], []
    per = int(read_gib * GIB) // len(files) // (4 << 20)
    for f in files:
        size = os.path.getsize(f) // (4 << 20)
        if size == 0 or per == 0:
            continue
        # A reader per file; one that wraps round restarts it at 0.
        passes, rest = divmod(per, size)
        cmd = ' ; '.join(['dd if={0} of=/dev/null bs=4M iflag=direct status=none'.format(f)] *
                         passes + ['dd if={0} of=/dev/null bs=4M iflag=direct count={1} '
                                   'status=none'.format(f, rest)])
        procs.append(subprocess.Popen(['sh', '-c', cmd]))
    wper = int(write_gib * GIB) // len(files) // (4 << 20)
    for i, f in enumerate(files):
        out = os.path.join(work, 'floor{0}'.format(i))
        outs.append(out)
        # The source is in the page cache (the bench read it): these are writes only.
        size = max(os.path.getsize(f) // (4 << 20), 1)
        cmd = ' ; '.join('dd if={0} of={1} bs=4M oflag=direct conv=notrunc seek={2} count={3} '
                         'status=none'.format(f, out, k, min(size, wper - k))
                         for k in range(0, wper, size))
        procs.append(subprocess.Popen(['sh', '-c', cmd or 'true']))
    t0 = time.monotonic()
    for p in procs:
        p.wait()
    el = time.monotonic() - t0
    for out in outs:
        if os.path.exists(out):
            os.remove(out)
    os.sync()
    return el


def ours(src_dom, dst_pool, dst_name, store, prefix):
    cmd = ['/usr/bin/time', '-v', BIN, '--json', 'migrate', '--from', 'libvirt+' + URI,
           '--to', 'libvirt+' + URI, '--via', 'file://' + store, '--prefix', prefix,
           '--placement', dst_pool, '--name', dst_name, src_dom]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, phases = {}, {}
    for line in p.stdout:
        now = time.monotonic() - t0
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        kind = ev.get('event')
        key = (ev.get('phase'), ev.get('disk'))
        if kind == 'phase_started':
            started[key] = now
        elif kind == 'phase_finished' and key in started:
            phases[key[0]] = phases.get(key[0], 0.0) + now - started.pop(key)
    err = p.stderr.read()
    rc = p.wait()
    total = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError('virtrigaud failed ({0}): {1}'.format(rc, err[-2000:]))
    rss, cpu = 0, 0.0
    for l in err.splitlines():
        if 'Maximum resident set size' in l:
            rss = int(l.split(':')[1]) // 1024
        elif 'User time (seconds)' in l or 'System time (seconds)' in l:
            cpu += float(l.split(':')[1])
    phases['cpu'] = cpu
    return total, phases, rss


def by_hand(src_pool, src_vol, dst_pool, dst_vol, dst_name, vgib, work, store):
    steps = {}

    def step(name, *args):
        t = time.monotonic()
        sh(*args)
        steps[name] = steps.get(name, 0.0) + time.monotonic() - t

    tmp = os.path.join(work, 'dl.qcow2')
    staged = os.path.join(store, 'hand.qcow2')
    back = os.path.join(work, 'back.qcow2')
    conv = os.path.join(work, 'conv.qcow2')
    t0 = time.monotonic()
    step('vol-download', 'virsh', '-q', '-c', URI, 'vol-download', '--sparse', '--pool', src_pool,
         src_vol, tmp)
    step('convert-to-store', 'qemu-img', 'convert', '-O', 'qcow2', tmp, staged)
    step('sha256sum', 'sha256sum', staged)
    step('copy-back', 'cp', '--sparse=always', staged, back)
    step('convert-back', 'qemu-img', 'convert', '-O', 'qcow2', back, conv)
    step('vol-create', 'virsh', '-q', '-c', URI, 'vol-create-as', dst_pool, dst_vol,
         '{0}G'.format(vgib), '--format', 'qcow2')
    step('vol-upload', 'virsh', '-q', '-c', URI, 'vol-upload', '--sparse', '--pool', dst_pool,
         dst_vol, conv)
    path = virsh('vol-path', '--pool', dst_pool, dst_vol).strip()
    t = time.monotonic()
    define(domain_xml(dst_name, path), work)
    steps['define'] = time.monotonic() - t
    total = time.monotonic() - t0
    for f in (tmp, staged, back, conv):
        os.remove(f)
    return total, steps


def shares(parts, total):
    """Each phase's share of total; a 'cpu' entry (our CPU seconds) is printed apart."""
    text = ', '.join('{0} {1:.0%}'.format(k, v / total) for k, v in
                     sorted(parts.items(), key=lambda kv: -kv[1]) if k != 'cpu')
    if 'cpu' in parts:
        text += '; CPU {0:.2f} s'.format(parts['cpu'])
    return text


def bench(vgib, dgib, ndisks, base, one_disk):
    tag = 'vrgbench{0}'.format(os.getpid())
    src_dir, dst_dir = os.path.join(base, 'src'), os.path.join(base, 'dst')
    store, work = os.path.join(base, 'store'), os.path.join(base, 'work')
    for d in (src_dir, dst_dir, store, work):
        os.makedirs(d, exist_ok=True)
    src_pool, dst_pool, src_dom = tag + '-src', tag + '-dst', tag + '-vm'
    disks = [os.path.join(src_dir, 'disk{0}.qcow2'.format(i)) for i in range(ndisks)]
    print('== {0} disk(s) of {1} GiB virtual / {2} GiB data: preparing the source'.format(
        ndisks, vgib, dgib), flush=True)
    for disk in disks:
        make_source(disk, vgib, dgib)
    virsh('pool-create-as', src_pool, 'dir', '--target', src_dir)
    virsh('pool-create-as', dst_pool, 'dir', '--target', dst_dir)
    define(domain_xml(src_dom, disks), work)
    created = []
    res = {'ours': [], 'hand': [], 'rss': [], 'phases': [], 'steps': [], 'io': []}
    try:
        # Warm the page cache with the source once, for both.
        subprocess.run(['cat'] + disks, stdout=subprocess.DEVNULL, check=True)
        for r in range(ROUNDS):
            name = '{0}-ours{1}'.format(tag, r)
            # Earlier rounds' dirty pages are written back now, not inside the next timed run.
            os.sync()
            io0 = disk_io(base)
            total, phases, rss = ours(src_dom, dst_pool, name, store, 'm/{0}'.format(r))
            io = io_since(base, io0)
            res['io'].append(io)
            created.append(name)
            res['ours'].append(total)
            res['rss'].append(rss)
            res['phases'].append(phases)
            print('  ours    round {0}: {1:6.2f} s  peak RSS {2} MiB  ({3}){4}'.format(
                r, total, rss, shares(phases, total),
                '  disk read {0:.2f} GiB, written {1:.2f} GiB'.format(*io) if io else ''),
                flush=True)
            shutil.rmtree(os.path.join(store, 'm'), ignore_errors=True)
            if ndisks > 1 or not HAND:
                continue
            name = '{0}-hand{1}'.format(tag, r)
            os.sync()
            io0 = disk_io(base)
            total, steps = by_hand(src_pool, 'disk0.qcow2', dst_pool, 'hand{0}.qcow2'.format(r),
                                   name, vgib, work, store)
            created.append(name)
            res['hand'].append(total)
            res['steps'].append(steps)
            io = io_since(base, io0)
            print('  by hand round {0}: {1:6.2f} s  ({2}){3}'.format(
                r, total, shares(steps, total),
                '  disk read {0:.2f} GiB, written {1:.2f} GiB'.format(*io) if io else ''),
                flush=True)
        o = statistics.median(res['ours'])
        # What the disk needs on its own for the bytes ours moved (median run's counts).
        ios = [x for x in res['io'] if x]
        if ios:
            rd = statistics.median(x[0] for x in ios)
            wr = statistics.median(x[1] for x in ios)
            fl = statistics.median(device_floor(disks, rd, wr, work) for _ in range(ROUNDS))
            print('  disk on its own for the same {0:.2f} GiB read + {1:.2f} GiB written: '
                  '{2:.2f} s (ours is {3:.2f}x that)'.format(rd, wr, fl, o / fl), flush=True)
        if ndisks > 1:
            base1 = one_disk.get((vgib, dgib))
            print('RESULT {0}x {1}G/{2}G: ours {3:.2f} s{4}, peak RSS {5} MiB (median of {6})'.format(
                ndisks, vgib, dgib, o,
                ', {0:.2f}x the one-disk time'.format(o / base1) if base1 else '',
                max(res['rss']), ROUNDS), flush=True)
            mid = res['ours'].index(o)
            print('  ours phases (median run, summed over disks): ' + shares(res['phases'][mid], o))
            return
        one_disk[(vgib, dgib)] = o
        if not HAND:
            print('RESULT {0}G/{1}G: ours {2:.2f} s, peak RSS {3} MiB (median of {4})'.format(
                vgib, dgib, o, max(res['rss']), ROUNDS), flush=True)
            return
        h = statistics.median(res['hand'])
        print('RESULT {0}G/{1}G: ours {2:.2f} s, by hand {3:.2f} s, ratio {4:.2f}, '
              'peak RSS {5} MiB (medians of {6})'.format(vgib, dgib, o, h, o / h,
                                                           max(res['rss']), ROUNDS), flush=True)
        mid = res['ours'].index(o)
        print('  ours phases (median run): ' + shares(res['phases'][mid], o))
        mid = res['hand'].index(h)
        print('  by hand steps (median run): ' + shares(res['steps'][mid], h))
    finally:
        for name in created:
            virsh('undefine', name, check=False)
        virsh('undefine', src_dom, check=False)
        for pool in (src_pool, dst_pool):
            virsh('pool-destroy', pool, check=False)
        shutil.rmtree(base, ignore_errors=True)


def main():
    specs = sys.argv[1:] or ['4/1', '4/1x2', '10/3']
    root = os.environ.get('VRG_BENCH_DIR', '/var/tmp')
    one_disk = {}
    for spec in specs:
        size, _, n = spec.partition('x')
        v, d = (int(x) for x in size.split('/'))
        bench(v, d, int(n or 1), tempfile.mkdtemp(prefix='vrg-bench-', dir=root), one_disk)


if __name__ == '__main__':
    main()
