"""Starts fakepve (PyPI, AGPL-3.0: run as a library, never copied) for virtrigaud's tests.

fakepve's own command line cannot create API tokens, add the `import` content type to a storage
or pick the PVE version, which the Proxmox provider's tests need; this launcher does exactly
that through fakepve's documented Python API (`FakePve`, `add_vm`, `apitokens`, `storages`,
`version`) and nothing else.

    serve.py SPEC.json    # {"host", "port", "user", "password", "cert", "key", "version",
                          #  "tokens": {"user@realm!id": "secret"}, "acl": {...}, "guests": [...]}
"""

import asyncio
import json
import sys

from fakepve import FakePve


async def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    pve = FakePve(user=spec['user'], password=spec['password'], host=spec['host'], port=spec['port'])
    pve.time_scale = 0.0
    if spec.get('version'):
        pve.version = spec['version']
        pve.release_version = '.'.join(spec['version'].split('.')[:2])
    pve.apitokens.update(spec.get('tokens', {}))
    if spec.get('ticket_ttl'):
        pve.ticket_ttl = spec['ticket_ttl']  # seconds a login ticket lives (PVE: 7200)
    # Per-path privileges ({"user@realm": [["/path", ["Priv", ...]], ...]}); root@pam holds all.
    if spec.get('acl'):
        pve.acl = {user: [(path, set(privs)) for path, privs in grants] for user, grants in spec['acl'].items()}
    # PVE 8.4+ file storages take disk images for import (`content=import`).
    for name, content in spec.get('storage_content', {}).items():
        pve.storages[name]['content'] = content
    for g in spec.get('guests', []):
        vm = pve.add_vm(g['vmid'], g['name'], node=g.get('node', 'pve1'), status=g.get('status', 'stopped'),
                        config=g.get('config', {}), lock=g.get('lock'))
        for key in ('shutdown_secs', 'start_error', 'ha_state', 'acpi'):
            if key in g:
                setattr(vm, key, g[key])
    await pve.start(spec['cert'], spec['key'])
    print('fakepve {0} listening on https://{1}:{2}'.format(pve.version, pve.host, pve.port), flush=True)
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1]))
