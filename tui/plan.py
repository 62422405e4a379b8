"""The Migrate form's model: check it, turn it into export job definitions, explain them.

Pure functions, no Textual: the form screen fills a `MigrationForm`, shows
`describe()` for every definition of `build_definitions()`, and submits them.
The service validates again at submit time; these checks give the person the
same rules before anything is sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

EXPORT_METHODS = ("ova", "ovf", "disk")
OUTPUT_FORMATS = ("qcow2", "raw")
# How the disks reach KVM: only exported, converted here, or handed to hyper2kvm.
MODES = {"export": "Export only", "direct": "Direct pipeline (convert here)",
         "daemon": "hyper2kvm daemon (Artifact Manifest)"}


@dataclass
class MigrationForm:
    export_method: str = "ova"
    export_path: str = ""          # a parent directory under export.base_path; "" = default
    shutdown_vm: bool = False
    remove_cdrom: bool = True
    compress: bool = False
    mode: str = "direct"
    output_format: str = "qcow2"
    compression: bool = False
    instance: str = "default"
    import_to_kvm: bool = True
    network: str = "default"
    autostart: bool = False


def validate(form: MigrationForm, vms: list[dict]) -> list[str]:
    """Every broken rule as "field: rule"; empty when the form can be submitted."""
    errors = []
    if not vms:
        errors.append("vms: select at least one VM (space marks VMs on the VMs screen)")
    if form.export_method not in EXPORT_METHODS:
        errors.append("export method: one of " + ", ".join(EXPORT_METHODS))
    if ".." in PurePosixPath(form.export_path).parts:
        errors.append("export path: must not contain '..'")
    if form.mode not in MODES:
        errors.append("mode: one of " + ", ".join(MODES))
    if form.mode != "export":
        if form.output_format not in OUTPUT_FORMATS:
            errors.append("format: one of " + ", ".join(OUTPUT_FORMATS))
        if form.output_format == "raw" and form.compression:
            errors.append("compression: only qcow2 output can be compressed")
    if form.mode == "daemon" and not form.instance.strip():
        errors.append("instance: the hyper2kvm@ instance name must not be empty")
    if form.import_to_kvm and form.mode == "export":
        errors.append("import to KVM: needs a conversion (direct pipeline or hyper2kvm daemon)")
    if form.import_to_kvm and not form.network.strip():
        errors.append("network: must not be empty when importing to KVM")
    if form.autostart and not form.import_to_kvm:
        errors.append("autostart: needs import to KVM")
    return errors


def _integration(form: MigrationForm) -> dict:
    if form.mode == "export":
        return {"enabled": False}
    block = {"enabled": True, "daemon_mode": form.mode == "daemon",
             "auto_convert": form.mode == "direct", "format": form.output_format,
             "compression": form.compression and form.output_format == "qcow2",
             "import_to_kvm": form.import_to_kvm}
    if form.mode == "daemon":
        block["instance"] = form.instance.strip()
    if form.import_to_kvm:
        block.update(network=form.network.strip(), autostart=form.autostart)
    return block


def build_definitions(form: MigrationForm, vms: list[dict]) -> list[dict]:
    """One export job definition (the /jobs/submit body) per VM."""
    definitions = []
    for vm in vms:
        definition = {
            "vm_identifier": vm["identifier"], "provider": vm["provider"],
            "export_method": form.export_method,
            "options": {"shutdown_vm": form.shutdown_vm, "remove_cdrom": form.remove_cdrom,
                        "compress": form.compress},
            "hyper2kvm_integration": _integration(form),
        }
        if form.export_path.strip():
            parent = PurePosixPath(form.export_path.strip())
            definition["export_path"] = str(parent / vm.get("name", vm["identifier"]))
        definitions.append(definition)
    return definitions


def describe(definition: dict, vm_name: str) -> list[str]:
    """What the job will do, step by step, in words."""
    options = definition["options"]
    where = definition.get("export_path", "the default export directory")
    extras = [text for flag, text in (("shutdown_vm", "shut it down first"),
                                      ("remove_cdrom", "remove CD-ROMs"),
                                      ("compress", "compress")) if options[flag]]
    steps = [f"export {vm_name} from {definition['provider']} as "
             f"{definition['export_method'].upper()} to {where}"
             + (f" ({', '.join(extras)})" if extras else "")]
    block = definition["hyper2kvm_integration"]
    if not block["enabled"]:
        return steps
    output = block["format"] + (" (compressed)" if block.get("compression") else "")
    if block["daemon_mode"]:
        steps.append(f"hand off to hyper2kvm@{block.get('instance', 'default')} through an "
                     f"Artifact Manifest; it converts to {output}")
    else:
        steps.append(f"convert the disks to {output} with the built-in converter")
    if block["import_to_kvm"]:
        steps.append(f"define a libvirt domain on network {block['network']}"
                     + (", autostart" if block.get("autostart") else ""))
    return steps
