"""A polkit refusal reaches the person as words that name the missing permission."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import pwd

from hypersdk.client.errors import ClientError
from hypersdk.tui.app import HyperctlApp
from hypersdk.tui.client import HyperClient
from tests.support.system import MEMBER, OUTSIDER

from ..support.wait import pilot_until
from .conftest import submit_job
from .fake_client import NOW, FakeConsoleClient


def _cancel_as(user: str, address: str, job_id: str, results) -> None:
    """In a forked child: become `user`, connect with the real client, try to cancel."""
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)

    async def attempt() -> str:
        client = HyperClient(address)
        try:
            await client.connect()
            await client.cancel(job_id)
        except ClientError as exc:
            return f"{exc.name}|{exc.message}"
        finally:
            client.close()
        return "allowed"

    results.put(asyncio.run(attempt()))


def _refusal(address: str, user: str, job_id: str) -> tuple[str, str]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_cancel_as, args=(user, address, job_id, results))
    child.start()
    outcome = results.get(timeout=30)
    child.join(10)
    name, _, message = outcome.partition("|")
    return name, message


def test_member_cancel_of_anothers_job_is_refused_naming_the_action(system_bus, hypervisord,
                                                                     users):
    job_id = submit_job(system_bus.address, {"steps": 50, "interval": 0.1}, "sleep")
    name, message = _refusal(system_bus.address, MEMBER, job_id)
    assert name == "AccessDenied", message
    assert message.startswith("permission denied: not authorized for "
                              "org.hypersdk.HyperSDK1.cancel-job-other-user"), message


def test_outsider_is_refused_naming_the_group(system_bus, hypervisord, users):
    """The bus lets only members of group hypersdk read the service: a console started
    by anybody else stops at connect, saying why."""
    job_id = submit_job(system_bus.address, {"steps": 50, "interval": 0.1}, "sleep")
    name, message = _refusal(system_bus.address, OUTSIDER, job_id)
    assert name == "AccessDenied", message
    assert message.startswith("hypervisord did not list its objects: permission denied: "
                              "only root and members of group hypersdk may talk to "
                              "hypervisord"), message


class RefusingFakeClient(FakeConsoleClient):
    """A fake transport that refuses cancel with an error the real service gave."""

    def __init__(self, refusal: ClientError) -> None:
        super().__init__()
        self.refusal = refusal

    async def cancel(self, job_id: str) -> None:
        raise self.refusal


async def test_console_shows_the_services_refusal_as_a_notification(system_bus, hypervisord,
                                                                     users):
    """The refusal a member really gets for another user's job (from the real service),
    shown by the console as an error notification titled for what it is."""
    job_id = submit_job(system_bus.address, {"steps": 50, "interval": 0.1}, "sleep")  # root's
    name, message = _refusal(system_bus.address, MEMBER, job_id)  # forks: not from a thread
    app = HyperctlApp(RefusingFakeClient(ClientError(message, name)), clock=lambda: NOW)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("down", "c")
        notes = await pilot_until(pilot, lambda: [(n.title, n.message, n.severity)
                                                  for n in app._notifications],
                                  what="a notification")
        assert notes == [("Not authorized", message, "error")]
        assert "cancel-job-other-user" in message
