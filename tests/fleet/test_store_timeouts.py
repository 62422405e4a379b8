"""The PostgreSQL store's timeouts and reconnection (service/pgstore.py), against the real
server of tests/support/postgres.py: a statement past database.statement_timeout, a
connection the server dropped, a server that does not answer a connect."""
from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from hypersdk.service.errors import Failed
from hypersdk.service.store import JobRecord, open_store


def _job(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, kind="sleep", status="pending", definition={},
                     created_at=time.time())


async def test_a_statement_past_the_timeout_fails_naming_the_setting_and_the_store_goes_on(postgres):
    store = await open_store(postgres.new_database(), statement_timeout=0.2)
    try:
        with pytest.raises(store.errors) as raised:
            await store.execute("SELECT pg_sleep(5)")
        assert "did not finish a statement within database.statement_timeout (0.2s)" \
            in str(raised.value)
        await store.insert_job(_job("job-after"))
        assert (await store.get_job("job-after")).status == "pending"
    finally:
        await store.close()


async def test_a_connection_the_server_dropped_is_opened_again_by_the_next_call(postgres):
    url = postgres.new_database()
    store = await open_store(url)
    try:
        backend = (await store.execute("SELECT pg_backend_pid()")).fetchone()[0]
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(store.errors):  # the call that finds it dropped fails
            await store.insert_job(_job("job-lost"))
        await store.insert_job(_job("job-kept"))
        assert [job.id for job in await store.list_jobs()] == ["job-kept"]
        assert (await store.execute("SELECT pg_backend_pid()")).fetchone()[0] != backend
    finally:
        await store.close()


async def test_a_server_that_does_not_answer_fails_the_connect_after_the_timeout(postgres):
    """The postmaster stopped (SIGSTOP): the kernel queues the connection, nobody
    answers it; open_store fails after database.connect_timeout, saying so."""
    url = postgres.new_database()
    os.kill(postgres.process.pid, signal.SIGSTOP)
    began = time.monotonic()
    try:
        with pytest.raises(Failed) as raised:
            await open_store(url, connect_timeout=2)
    finally:
        os.kill(postgres.process.pid, signal.SIGCONT)
    waited = time.monotonic() - began
    assert raised.value.message.endswith("(database.connect_timeout is 2s)")
    assert "password" not in raised.value.message
    assert 1.5 < waited < 10
