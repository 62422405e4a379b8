"""The Migrate form's rules and the export definitions it produces."""
from __future__ import annotations

from hypersdk.tui.plan import MigrationForm, build_definitions, describe, validate

VMS = [{"identifier": "vm-1", "name": "web01", "provider": "vsphere"},
       {"identifier": "vm-2", "name": "db01", "provider": "vsphere"}]


def test_defaults_are_valid_and_give_a_direct_pipeline_with_import():
    form = MigrationForm()
    assert validate(form, VMS) == []
    first, second = build_definitions(form, VMS)
    assert first == {
        "vm_identifier": "vm-1", "provider": "vsphere", "export_method": "ova",
        "options": {"shutdown_vm": False, "remove_cdrom": True, "compress": False},
        "hyper2kvm_integration": {"enabled": True, "daemon_mode": False, "auto_convert": True,
                                  "format": "qcow2", "compression": False,
                                  "import_to_kvm": True, "network": "default",
                                  "autostart": False},
    }
    assert second["vm_identifier"] == "vm-2" and "export_path" not in second


def test_export_path_is_a_parent_with_one_directory_per_vm():
    form = MigrationForm(export_path="migrations/weekend", mode="daemon", instance="vsphere",
                         import_to_kvm=False)
    definitions = build_definitions(form, VMS)
    assert [d["export_path"] for d in definitions] == ["migrations/weekend/web01",
                                                       "migrations/weekend/db01"]
    assert definitions[0]["hyper2kvm_integration"] == {
        "enabled": True, "daemon_mode": True, "auto_convert": False, "format": "qcow2",
        "compression": False, "import_to_kvm": False, "instance": "vsphere"}
    steps = describe(definitions[0], "web01")
    assert steps[1].startswith("hand off to hyper2kvm@vsphere through an Artifact Manifest")


def test_each_broken_rule_is_named():
    form = MigrationForm(export_path="../etc", mode="export", import_to_kvm=True, network=" ",
                         autostart=True, export_method="zip")
    assert validate(form, []) == [
        "vms: select at least one VM (space marks VMs on the VMs screen)",
        "export method: one of ova, ovf, disk",
        "export path: must not contain '..'",
        "import to KVM: needs a conversion (direct pipeline or hyper2kvm daemon)",
        "network: must not be empty when importing to KVM",
    ]
    raw = MigrationForm(output_format="raw", compression=True, import_to_kvm=False,
                        autostart=True)
    assert validate(raw, VMS) == ["compression: only qcow2 output can be compressed",
                                  "autostart: needs import to KVM"]


def test_export_only_describes_one_step():
    form = MigrationForm(mode="export", import_to_kvm=False, shutdown_vm=True, compress=True)
    (definition,) = build_definitions(form, VMS[:1])
    assert definition["hyper2kvm_integration"] == {"enabled": False}
    assert describe(definition, "web01") == [
        "export web01 from vsphere as OVA to the default export directory "
        "(shut it down first, remove CD-ROMs, compress)"]
