"""The spec's curls as written (only the VM id adapted), through the bridge to hypervisord."""
from __future__ import annotations

from .stack import curl, post_json

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


def test_submit_for_an_unconfigured_provider_names_the_provider(bridge):
    answer = post_json(bridge, "/jobs/submit", SPEC_EXPORT)
    assert answer.status == 400, answer.body
    assert answer.json()["error"] == "InvalidArgument" and answer.json()["field"] == "provider"


def test_webhook_secrets_never_come_back(bridge):
    created = post_json(bridge, "/webhooks/configure", {**SPEC_WEBHOOK, "secret": "s3cr3t-value"})
    assert created.status == 200, created.body
    text = curl(bridge, "/webhooks").body
    assert "token123" not in text and "s3cr3t-value" not in text
    assert created.json()["has_secret"] is True


def test_bad_schedule_names_the_field(bridge):
    answer = post_json(bridge, "/schedules/create", {**SPEC_SCHEDULE, "cron": "every day"})
    assert answer.status == 400 and answer.json()["field"] == "cron", answer.body
