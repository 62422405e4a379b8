"""The service's bus connection: the client's protected connection, plus ObjectManager
signals sent from the manager's own path (see hypersdk.client.bus for the protection)."""
from __future__ import annotations

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from hypersdk.client.bus import bus_kwargs, connect_bus
from hypersdk.client.names import OBJECT_MANAGER_IFACE as OBJECT_MANAGER


class ObjectManagerBus(MessageBus):
    """A bus that sends InterfacesAdded/Removed from the ObjectManager's own path.

    dbus-fast emits them from the exported object's path; the D-Bus specification and
    GDBusObjectManagerClient expect them from the ObjectManager object, so a client
    that follows the manager would never hear of new jobs.
    """

    manager_path = "/"

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected:
            return
        properties = {
            prop.name: Variant(prop.signature, prop.prop_getter(interface))
            for prop in ServiceInterface._get_properties(interface)
            if not prop.disabled and prop.access.readable()
        }
        self.send(Message.new_signal(self.manager_path, OBJECT_MANAGER, "InterfacesAdded",
                                     "oa{sa{sv}}", [path, {interface.name: properties}]))

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self.send(Message.new_signal(self.manager_path, OBJECT_MANAGER, "InterfacesRemoved",
                                     "oas", [path, removed_interfaces]))


async def connect(spec: str, manager_path: str) -> MessageBus:
    """The service's connection: ObjectManager signals come from `manager_path`."""
    bus = ObjectManagerBus(**bus_kwargs(spec))
    bus.manager_path = manager_path
    return await connect_bus(bus)
