"""The request bodies of the spec's curls (../shared/spec/hypersdk-hyper2kvm-workflow.txt),
as written, but the VM id."""

SPEC_EXPORT = {
    "vm_identifier": "vm-123", "provider": "vsphere", "export_method": "ova",
    "export_path": "/exports/vm-123",
    "options": {"shutdown_vm": False, "remove_cdrom": True, "compress": True},
    "hyper2kvm_integration": {"enabled": True, "auto_convert": False, "daemon_mode": True,
                              "instance": "vsphere"},
}
SPEC_SCHEDULE = {
    "name": "nightly-vm-backup", "cron": "0 2 * * *",
    "job_definition": {"vm_identifier": "vm-123", "provider": "vsphere", "export_method": "ova",
                       "export_path": "/exports/nightly",
                       "hyper2kvm_integration": {"enabled": True, "daemon_mode": True}},
}
SPEC_POLICY = {
    "name": "production-vms", "vm_filter": {"tags": ["production"], "datacenter": "DC1"},
    "schedule": "0 2 * * *", "retention": {"count": 7, "age_days": 30},
    "export_options": {"hyper2kvm_integration": {"enabled": True, "daemon_mode": True}},
}
SPEC_WEBHOOK = {
    "url": "https://monitoring.example.com/hypersdk-events",
    "events": ["job.started", "job.completed", "job.failed"],
    "headers": {"Authorization": "Bearer token123"},
}
