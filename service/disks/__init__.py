"""Disk and format libraries: VMDK, streamOptimized, qcow2, OVF/OVA, downloads, qemu-img.

They know files and bytes, not jobs, providers or libvirt; every layer above uses them.
"""
