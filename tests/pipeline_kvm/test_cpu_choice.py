"""The guest CPU is one the real libvirtd at qemu:///system starts on this host.

On the project's machines (AMD EPYC VMs with nested KVM) QEMU refuses host-passthrough
with "failed to set MSR 0x10a"; where KVM is native or absent other candidates win.
Each test holds on any of them: it checks what the host refused is passed over and
what was chosen really runs a guest.
"""
from __future__ import annotations

import uuid

import libvirt
import pytest
from lxml import etree

from hypersdk.service.errors import Failed
from hypersdk.service.kvm import cpu_choice
from hypersdk.service.kvm.cpu_choice import CpuChoice, choose_cpu, probe
from hypersdk.service.kvm.domain_xml import DomainDisk, DomainSpec, GuestCpu
from hypersdk.service.kvm.libvirt_import import import_domain

from tests.support.bootdisk import write_boot_disk

from .conftest import wait_for_line

# libvirt's message when QEMU 7.2 dies on a nested-KVM AMD host (host-passthrough)
NESTED_KVM_ERROR = (
    "internal error: qemu unexpectedly closed the monitor: 2026-12-04T19:03:46.622940Z "
    "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
    "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion "
    "`ret == cpu->kvm_msr_buf->nmsrs' failed.")


def offered_type(conn) -> str:
    caps = etree.fromstring(conn.getCapabilities().encode())
    return "kvm" if caps.xpath("guest[arch/@name='x86_64']/arch/domain[@type='kvm']") else "qemu"


def unusable_model(conn, domain_type: str) -> str:
    """A named CPU model libvirt says this host cannot run in full."""
    caps = etree.fromstring(conn.getDomainCapabilities(None, "x86_64", None,
                                                       domain_type).encode())
    models = caps.xpath("cpu/mode[@name='custom']/model[@usable='no']/text()")
    if not models:
        pytest.skip("this host runs every CPU model libvirt knows")
    return models[0]


async def boots(names: list[str], choice: CpuChoice, guest_dir) -> None:
    """Boot the boot-sector disk with `choice` and wait for its line on the console."""
    spec = DomainSpec(name="hypersdk-cpu-" + uuid.uuid4().hex[:6], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(write_boot_disk(guest_dir / "boot.raw"), "raw")],
                      domain_type=choice.domain_type, cpu=choice.cpu,
                      serial_log=guest_dir / "serial.log")
    names.append(spec.name)
    await import_domain("qemu:///system", spec, start=True)
    wait_for_line(guest_dir / "serial.log")


async def test_a_cpu_the_host_refuses_is_passed_over_for_one_that_runs(libvirt_system, guest_dir):
    conn, names = libvirt_system
    offered = offered_type(conn)
    refused = GuestCpu("custom", unusable_model(conn, offered), check="partial")
    candidates = [(offered, refused),
                  *cpu_choice.default_candidates(libvirt, conn, offered)]
    choice = probe(libvirt, conn, candidates)
    assert choice.cpu != refused
    assert choice.reason.startswith(f"model {refused.model} refused: the CPU is incompatible "
                                    "with host CPU: Host CPU does not provide required features")
    assert choice.reason.endswith(f"{choice.cpu.describe()} started")
    await boots(names, choice, guest_dir)


async def test_the_automatic_choice_runs_a_guest_and_says_what_was_refused(libvirt_system, guest_dir):
    conn, names = libvirt_system
    offered = offered_type(conn)
    choice = choose_cpu(libvirt, conn, "qemu:///system", "auto", offered)
    assert choose_cpu(libvirt, conn, "qemu:///system", "auto", offered) is choice  # probed once
    tried = cpu_choice.default_candidates(libvirt, conn, offered)
    steps = choice.reason.split("; ")
    assert steps[-1] == f"{choice.cpu.describe()} started"
    for step in steps[:-1]:  # each candidate before the chosen one was refused, with why
        assert " refused: " in step and step.split(" refused: ")[1]
    if (choice.domain_type, choice.cpu) != tried[0]:
        assert steps[0].startswith(f"{tried[0][1].describe()} refused: ")
    await boots(names, choice, guest_dir)
    # not only boot-sector code: a Linux kernel runs with it (nested KVM can run none)
    assert cpu_choice.runs_kernel(libvirt, conn, choice.domain_type, choice.cpu, seconds=60)


def test_no_candidate_starting_is_an_error_listing_each_refusal(libvirt_system):
    conn, _names = libvirt_system
    offered = offered_type(conn)
    model = unusable_model(conn, offered)
    with pytest.raises(Failed, match=rf"^no guest CPU starts on this host: model {model} "
                                     r"refused: the CPU is incompatible with host CPU"):
        probe(libvirt, conn, [(offered, GuestCpu("custom", model, check="partial"))])


async def test_a_pinned_model_the_host_lacks_is_refused_naming_the_features(libvirt_system,
                                                                            guest_dir):
    conn, names = libvirt_system
    if offered_type(conn) != "kvm":
        pytest.skip("a pinned model runs under KVM, which this host does not offer")
    model = unusable_model(conn, "kvm")
    spec = DomainSpec(name="hypersdk-cpu-" + uuid.uuid4().hex[:6], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(write_boot_disk(guest_dir / "boot.raw"), "raw")])
    names.append(spec.name)
    with pytest.raises(Failed, match="could not start domain .* Host CPU does not provide "
                                     "required features"):
        await import_domain("qemu:///system", spec, start=True, cpu_mode=f"custom:{model}")
    assert spec.name not in conn.listDefinedDomains()


async def test_a_pinned_mode_is_used_as_is_and_said_so(test_driver, tmp_path):
    disk = write_boot_disk(tmp_path / "boot.raw")
    spec = DomainSpec(name="vm-" + uuid.uuid4().hex[:8], memory_mb=64, vcpus=1,
                      disks=[DomainDisk(disk, "raw")])
    result = await import_domain("test:///default", spec, cpu_mode="tcg")
    root = etree.fromstring(test_driver.lookupByName(spec.name).XMLDesc())
    assert (root.get("type"), root.find("cpu").get("mode")) == ("qemu", "maximum")
    assert result.to_dict()["cpu"] == {"mode": "maximum", "model": "", "disabled_features": [],
                                       "domain_type": "qemu",
                                       "reason": "pinned by libvirt.cpu_mode: tcg"}


def test_features_behind_refused_msrs_are_named():
    assert cpu_choice.refused_features(NESTED_KVM_ERROR) == ("arch-capabilities",)
    assert cpu_choice.refused_features("failed to set MSR 0x48 to 0x1") == ()
    assert cpu_choice.short_error(NESTED_KVM_ERROR) == "failed to set MSR 0x10a to 0x69"
