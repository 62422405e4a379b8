"""/openapi.json matches the route table, is valid OpenAPI 3, and schemathesis finds no 5xx."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from hypersdk.http_bridge import openapi
from hypersdk.http_bridge.app import ROUTES

from .stack import curl


@pytest.fixture
def bridge(shared_bridge):
    """These tests only add jobs and read, so they share one hypervisord and bridge."""
    return shared_bridge


def test_every_route_is_documented_and_every_operation_is_a_route(bridge):
    served = curl(bridge, "/openapi.json").json()
    documented = {(path, method.upper()) for path, operations in served["paths"].items()
                  for method in operations}
    assert documented == {(route.path, route.method) for route in ROUTES}


def test_the_document_is_valid_openapi_3():
    validate(openapi.document())


def test_public_routes_are_documented_without_security():
    public = {route.path for route in ROUTES if route.role == "public"}
    document = openapi.document()
    assert {path for path, ops in document["paths"].items()
            if all(op.get("security") == [] for op in ops.values())} == public


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_break(bridge, sleep_job, tmp_path):
    sleep_job(steps=1, interval=0.01)
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(schemathesis), "run", f"{bridge.url}/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance",
         # one worker: with two, schemathesis's own coverage phase intermittently dies in
         # a KeyError inside its generator (seen in CI runs; not an answer of the bridge)
         "--max-examples", "10", "--workers", "1", "--seed", "1",
         "--phases", "examples,coverage,fuzzing", "--max-time", "30",
         "--request-timeout", "30",  # a loaded CI machine must not look like a broken API
         "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    errors_at = run.stdout.find("ERRORS")
    assert run.returncode == 0, run.stdout[max(0, errors_at):][:8000] + run.stderr[-2000:]
