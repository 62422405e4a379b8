"""Method calls with a known caller, authorised by polkit before they act.

dbus-fast hands a service method its arguments but not the message, so it cannot
tell who called. This dispatcher sees every incoming method call first (a bus
message handler), and for our own interfaces runs the method in a task of its own
with the caller stored in a context variable. Each call has its own task and so its
own context: two callers whose calls overlap can never see each other's identity.
Methods then call `await require(action)` before they change anything.

The caller is the connection's Unix user, unless the call comes from the REST bridge's
own user (`api.bridge_user`) or root and its options name the REST user it is made
for (`requested_by`, `requested_role`): then that user is the principal, recorded on
the jobs it submits and used for "another user's job" rules (polkit.py). Anybody
else naming a principal is refused.

Properties, introspection and ObjectManager stay with dbus-fast (the bus policy lets
only members of group hypersdk read them).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import pwd

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from ..errors import ERROR_PREFIX, HyperSDKError, InvalidArgument, Unavailable
from ..principals import REST_NAME_RULE, ROLES, is_rest_name
from .polkit import AccessDenied, Authority, Caller

log = logging.getLogger(__name__)

OUR_INTERFACE_PREFIX = "org.hypersdk.HyperSDK1."
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller")
_authority: contextvars.ContextVar[Authority] = contextvars.ContextVar("authority")


def caller() -> Caller:
    return current_caller.get()


async def require(action: str) -> Caller:
    """Check `action` for the caller of the method being handled; AccessDenied if refused."""
    who = current_caller.get()
    await _authority.get().check(who, action)
    return who


PRINCIPAL_OPTION, ROLE_OPTION = "requested_by", "requested_role"


def unix_principal(uid: int) -> str:
    try:
        return f"unix:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"unix:{uid}"


def principal_of(uid: int, options: dict, trusted_uids: frozenset[int]) -> tuple[str, str]:
    """(principal, REST role) of a call from `uid` with these options (module docstring)."""
    if PRINCIPAL_OPTION not in options and ROLE_OPTION not in options:
        return unix_principal(uid), ""
    if uid not in trusted_uids:
        raise AccessDenied(f"only hypersdk-bridge may act for a REST user "
                           f"({PRINCIPAL_OPTION}/{ROLE_OPTION}); uid {uid} is not it")
    name, role = options.get(PRINCIPAL_OPTION), options.get(ROLE_OPTION)
    name = name.value if name is not None and name.signature == "s" else None
    role = role.value if role is not None and role.signature == "s" else None
    if not is_rest_name(name):
        raise InvalidArgument(f"options.{PRINCIPAL_OPTION}", f"a REST user name "
                                                             f"({REST_NAME_RULE})")
    if role not in ROLES:
        raise InvalidArgument(f"options.{ROLE_OPTION}", "one of " + ", ".join(ROLES))
    return f"rest:{name}", role


class Dispatcher:
    def __init__(self, bus: MessageBus, authority: Authority,
                 trusted_uids: frozenset[int] = frozenset({0}),
                 store_errors: tuple[type[Exception], ...] = ()) -> None:
        self._bus = bus
        self._authority = authority
        self._trusted_uids = trusted_uids
        self._store_errors = store_errors  # the job store's failures (Store.errors)
        self._objects: dict[str, dict[str, ServiceInterface]] = {}
        self._tasks: set[asyncio.Task] = set()
        bus.add_message_handler(self._on_message)

    def export(self, path: str, interface: ServiceInterface) -> None:
        self._bus.export(path, interface)
        self._objects.setdefault(path, {})[interface.name] = interface

    def unexport(self, path: str) -> None:
        self._bus.unexport(path)
        self._objects.pop(path, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _find(self, msg: Message):
        interfaces = self._objects.get(msg.path or "")
        if not interfaces:
            return None, None
        candidates = ([interfaces.get(msg.interface)] if msg.interface
                      else list(interfaces.values()))
        for interface in candidates:
            if interface is None:
                continue
            for method in ServiceInterface._get_methods(interface):
                if method.name == msg.member and not method.disabled:
                    return interface, method
        return None, None

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.interface and not msg.interface.startswith(OUR_INTERFACE_PREFIX):
            return False
        interface, method = self._find(msg)
        if interface is None:
            return False
        if msg.signature != method.in_signature:
            self._reply(msg, Message.new_error(
                msg, "org.freedesktop.DBus.Error.InvalidArgs",
                f"{method.name} takes arguments of type '{method.in_signature}', "
                f"not '{msg.signature}'"))
            return True
        task = asyncio.create_task(self._call(msg, interface, method))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _call(self, msg: Message, interface: ServiceInterface, method) -> None:
        uid = await self._authority.caller_uid(msg.sender)
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        _authority.set(self._authority)
        try:
            options = msg.body[-1] if method.in_signature.endswith("a{sv}") else {}
            principal, role = principal_of(uid, options, self._trusted_uids)
            current_caller.set(Caller(msg.sender, uid, interactive, principal, role))
            result = await method.fn(interface, *msg.body)
            out_types = method.out_signature_tree.types
            body = [] if not out_types else ([result] if len(out_types) == 1 else list(result))
            reply = Message.new_method_return(msg, method.out_signature, body)
        except HyperSDKError as exc:
            reply = Message.new_error(msg, exc.dbus_name, wire_safe(exc.message))
        except self._store_errors as exc:  # a lost or hung database: said, no traceback
            log.warning("%s.%s: the job store failed: %s", msg.interface, msg.member, exc)
            reply = Message.new_error(msg, ERROR_PREFIX + Unavailable.name, wire_safe(
                f"the job store is unavailable: {' '.join(str(exc).split())}"))
        except Exception as exc:
            log.exception("%s.%s failed", msg.interface, msg.member)
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed",
                                      f"internal error ({type(exc).__name__}); "
                                      "see the hypervisord journal")
        self._reply(msg, reply)

    def _reply(self, msg: Message, reply: Message) -> None:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self._bus.send(reply)
        except Exception:  # a reply that cannot be marshalled must not leave the caller hanging
            log.exception("cannot send the reply to %s.%s", msg.interface, msg.member)
            self._bus.send(Message.new_error(msg, ERROR_PREFIX + "Failed",
                                             "internal error: the reply could not be encoded"))


def wire_safe(text: str) -> str:
    """Text D-Bus can carry: no NUL, no lone surrogates (error messages quote user input)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\0")
