"""Whether a disk file is what its caller and its name say it is.

qemu-img reads any file it does not recognise as "raw" data, so an empty file, a
text file or a truncated image named `disk.vmdk` would "convert" into a useless
disk and the job would end completed. The rules, for every file a caller names:
- an empty image is refused;
- a file whose name promises a format (`.vmdk`, `.vhd`, `.vhdx`, `.qcow2`, `.raw`)
  must hold that format;
- raw data is accepted only when the caller says the file is raw (a `.raw` name or
  the format field), and a format the caller states must be the one found.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from ..errors import InvalidArgument

SOURCE_FORMATS = ("raw", "vmdk", "vpc", "vhdx", "qcow2")  # qemu-img's names
FORMAT_BY_SUFFIX = {".vmdk": "vmdk", ".vhd": "vpc", ".vhdx": "vhdx", ".qcow2": "qcow2",
                    ".raw": "raw"}


def check_claimed_format(found: str, virtual_size: int, name: str, claimed: str,
                         field_name: str, claim_field: str) -> None:
    """Refuse (InvalidArgument) a disk whose content (`found`, qemu-img's format name)
    contradicts its name or the caller's claim, or that is raw without the claim."""
    if virtual_size <= 0:
        raise InvalidArgument(field_name, f"{name} is empty: not a disk image")
    suffix = PurePosixPath(name).suffix.lower()
    named = FORMAT_BY_SUFFIX.get(suffix)
    if named and named != found:
        raise InvalidArgument(field_name, f"{name} is named like a {suffix} file but holds "
                                          f"{_describe(found)}: refused")
    if claimed and claimed != found:
        raise InvalidArgument(claim_field, f"{name} holds {_describe(found)}, not {claimed}")
    if found == "raw" and "raw" not in (claimed, named):
        raise InvalidArgument(field_name, f"{name} holds no disk format hypervisord recognises "
                                          f"(qemu-img reads it as raw data); if it is a raw "
                                          f"disk image, say so with {claim_field}: raw")


def _describe(found: str) -> str:
    return "raw data (no disk format)" if found == "raw" else f"a {found} image"
