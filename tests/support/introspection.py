"""An interface as documented (service/dbus/*.xml) and as the running service shows it
(`busctl introspect --xml-interface`), reduced to comparable member signatures."""
from __future__ import annotations

from pathlib import Path

from lxml import etree

from hypersdk.client.names import BUS_NAME

from .cli import busctl

XML_DIR = Path(__file__).resolve().parents[2] / "service" / "dbus"


def _members(interface: etree._Element) -> dict[str, str]:
    """name -> signature summary of every method, property and signal of an interface."""
    members = {}
    for element in interface:
        if not isinstance(element.tag, str):
            continue
        name = element.get("name")
        if element.tag == "property":
            members[f"property {name}"] = element.get("type") + " " + element.get("access")
        elif element.tag in ("method", "signal"):
            args = [(a.get("direction", "out" if element.tag == "signal" else "in"), a.get("type"))
                    for a in element.findall("arg")]
            members[f"{element.tag} {name}"] = " ".join(f"{d}:{t}" for d, t in args)
    return members


def documented(interface_name: str) -> dict[str, str]:
    tree = etree.parse(str(XML_DIR / f"{interface_name}.xml"))
    return _members(tree.find(f"interface[@name='{interface_name}']"))


def live(address: str, path: str, interface_name: str) -> dict[str, str]:
    xml = busctl(address, "introspect", "--xml-interface", BUS_NAME, path).stdout
    root = etree.fromstring(xml.encode())
    return _members(root.find(f"interface[@name='{interface_name}']"))
