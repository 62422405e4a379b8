"""extract_ova / verify_manifest on good and hostile archives built here with tarfile."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from hypersdk.service.errors import AlreadyExists, Failed, InvalidArgument
from hypersdk.service.confine import open_source
from hypersdk.service.disks.ova_extract import extract_ova, verify_manifest

from .helpers import manifest

OVF_TEXT = (Path(__file__).with_name("sample.ovf")).read_bytes()
DISK1 = b"disk-one" * 10000
DISK2 = b"disk-two" * 5000


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""





def make_ova(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def good_members(alg: str = "SHA256") -> list:
    files = {"web01.ovf": OVF_TEXT, "web01-disk1.vmdk": DISK1, "web01-disk2.vmdk": DISK2}
    return [_file("web01.ovf", OVF_TEXT), _file("web01.mf", manifest(files, alg)),
            _file("web01-disk1.vmdk", DISK1), _file("web01-disk2.vmdk", DISK2)]


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".ova")


@pytest.mark.parametrize("alg", ["SHA256", "SHA1"])
def test_good_ova_extracts_and_verifies(tmp_path, alg):
    ova = make_ova(tmp_path / "web01.ova", good_members(alg))
    logs: list[str] = []
    ovf = extract_ova(ova, tmp_path / "out", log=logs.append)
    assert ovf == tmp_path / "out" / "web01.ovf"
    assert (tmp_path / "out" / "web01-disk1.vmdk").read_bytes() == DISK1
    assert any("manifest web01.mf checked" in line for line in logs)
    with open_source(str(ovf), [str(tmp_path)], "source_path") as opened:
        assert verify_manifest(opened) == {"web01.ovf": alg, "web01-disk1.vmdk": alg,
                                           "web01-disk2.vmdk": alg}
    assert leftovers(tmp_path) == ["out"]


def test_manifest_mismatch_leaves_nothing(tmp_path):
    members = good_members()
    members[2] = _file("web01-disk1.vmdk", DISK1[:-1] + b"X")
    ova = make_ova(tmp_path / "bad.ova", members)
    with pytest.raises(Failed, match=r"web01-disk1.vmdk: SHA256 digest mismatch"):
        extract_ova(ova, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_verify_manifest_catches_a_changed_file(tmp_path):
    ova = make_ova(tmp_path / "web01.ova", good_members())
    out = tmp_path / "out"
    extract_ova(ova, out)
    (out / "web01-disk2.vmdk").write_bytes(b"tampered")
    with open_source(str(out / "web01.ovf"), [str(tmp_path)], "source_path") as opened, \
            pytest.raises(Failed, match="web01-disk2.vmdk: SHA256 digest mismatch"):
        verify_manifest(opened)


def test_verify_manifest_refuses_a_listed_file_that_is_a_symlink(tmp_path):
    ova = make_ova(tmp_path / "web01.ova", good_members())
    out = tmp_path / "out"
    extract_ova(ova, out)
    (out / "web01-disk2.vmdk").unlink()
    (out / "web01-disk2.vmdk").symlink_to("/etc/shadow")
    with open_source(str(out / "web01.ovf"), [str(tmp_path)], "source_path") as opened, \
            pytest.raises(InvalidArgument, match="web01-disk2.vmdk is a symlink: refused"):
        verify_manifest(opened)


@pytest.mark.parametrize("member,message", [
    (_file("../../etc/x", b"pwned"), "member '../../etc/x' contains '..' and would escape"),
    (_file("/etc/x", b"pwned"), "member '/etc/x' has an absolute name"),
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"),
     "member 'link' is a symlink (to '/etc/passwd'): links are refused"),
    (_special("hard", tarfile.LNKTYPE, "web01.ovf"), "member 'hard' is a hard link"),
    (_special("dev", tarfile.CHRTYPE), "member 'dev' is a device file"),
    (_special("pipe", tarfile.FIFOTYPE), "member 'pipe' is a fifo"),
    (_file("web01.ovf", b"second copy"), "member 'web01.ovf' appears twice"),
])
def test_hostile_members_are_refused(tmp_path, member, message):
    ova = make_ova(tmp_path / "evil.ova", good_members()[:1] + [member] + good_members()[1:])
    with pytest.raises(InvalidArgument) as err:
        extract_ova(ova, tmp_path / "out")
    assert message in str(err.value)
    assert str(ova) in str(err.value)
    assert leftovers(tmp_path) == []
    assert not Path("/etc/x").exists()


def test_dot_slash_names_from_gnu_tar_are_fine(tmp_path):
    members = [_special("./", tarfile.DIRTYPE)] + [
        _file("./" + info.name, data) for info, data in good_members()]
    ova = make_ova(tmp_path / "dots.ova", members)
    ovf = extract_ova(ova, tmp_path / "out")
    assert ovf.name == "web01.ovf"
    assert (tmp_path / "out" / "web01-disk2.vmdk").read_bytes() == DISK2


def test_ovf_not_first_is_tolerated_with_a_warning(tmp_path):
    members = good_members()
    ova = make_ova(tmp_path / "late.ova", members[2:] + members[:2])
    logs: list[str] = []
    extract_ova(ova, tmp_path / "out", log=logs.append)
    assert any("not the .ovf descriptor" in line for line in logs)


def test_truncated_ova_leaves_nothing(tmp_path):
    ova = make_ova(tmp_path / "cut.ova", good_members())
    data = ova.read_bytes()
    ova.write_bytes(data[:len(data) // 2])
    with pytest.raises(Failed, match="truncated"):
        extract_ova(ova, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_not_a_tar_and_existing_target(tmp_path):
    junk = tmp_path / "junk.ova"
    junk.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises((Failed, InvalidArgument)):
        extract_ova(junk, tmp_path / "out")
    ova = make_ova(tmp_path / "web01.ova", good_members())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(AlreadyExists):
        extract_ova(ova, tmp_path / "taken")
