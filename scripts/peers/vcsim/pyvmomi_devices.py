"""Describes one VM with pyVmomi (VMware's own Python client), as JSON on stdout.

An independent check of what virtrigaud's SOAP subset created: the tests compare this against
the spec they migrated. Usage: pyvmomi_devices.py VM_NAME; the connection comes from the
VIRTRIGAUD_VSPHERE_{URL,USER,PASSWORD} and VIRTRIGAUD_VCSIM_CERT variables that vcsim.sh writes
(the certificate is the CA: the simulator's is self-signed).
"""
import json
import os
import ssl
import sys
from urllib.parse import urlparse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim


def main():
    name = sys.argv[1]
    u = urlparse(os.environ["VIRTRIGAUD_VSPHERE_URL"])
    ctx = ssl.create_default_context(cafile=os.environ["VIRTRIGAUD_VCSIM_CERT"])
    si = SmartConnect(host=u.hostname, port=u.port or 443,
                      user=os.environ["VIRTRIGAUD_VSPHERE_USER"],
                      pwd=os.environ["VIRTRIGAUD_VSPHERE_PASSWORD"], sslContext=ctx)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vms = [v for v in view.view if v.name == name]
        view.Destroy()
        if len(vms) != 1:
            sys.exit(f"{len(vms)} VMs named {name}")
        vm = vms[0]
        cfg = vm.config
        devices = {d.key: d for d in cfg.hardware.device}
        out = {
            "name": vm.name,
            "cpus": cfg.hardware.numCPU,
            "memory_mb": cfg.hardware.memoryMB,
            "firmware": cfg.firmware,
            "guest_id": cfg.guestId,
            "annotation": cfg.annotation,
            "disks": [],
            "nics": [],
        }
        for d in cfg.hardware.device:
            if isinstance(d, vim.vm.device.VirtualDisk):
                ctl = devices.get(d.controllerKey)
                out["disks"].append({
                    "key": d.key,
                    "controller": type(ctl).__name__.split(".")[-1] if ctl else None,
                    "bus_number": getattr(ctl, "busNumber", None),
                    "unit": d.unitNumber,
                    "file": d.backing.fileName,
                    "capacity": d.capacityInBytes or d.capacityInKB * 1024,
                    "thin": getattr(d.backing, "thinProvisioned", None),
                })
            elif isinstance(d, vim.vm.device.VirtualEthernetCard):
                net = None
                if isinstance(d.backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
                    net = d.backing.deviceName
                out["nics"].append({
                    "type": type(d).__name__.split(".")[-1],
                    "mac": d.macAddress,
                    "address_type": d.addressType,
                    "network": net,
                })
        json.dump(out, sys.stdout, indent=1, sort_keys=True)
    finally:
        Disconnect(si)


if __name__ == "__main__":
    main()
