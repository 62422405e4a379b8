"""Pipeline stages: export, disk formats, convert, libvirt domain, import, hand-off."""
