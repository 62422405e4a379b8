"""An OCI API key made for the test and `FakeOciServer` (fake_oci.py) on 127.0.0.1."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..support.servers import serve_app
from .fake_oci import FakeOciServer

TENANCY = "ocid1.tenancy.oc1..aaaaaaaatenancy"
USER = "ocid1.user.oc1..aaaaaaaauser"
COMPARTMENT = "ocid1.compartment.oc1..aaaaaaaacompartment"
FINGERPRINT = ":".join(["3c"] * 16)


@dataclass
class ApiKey:
    key_file: Path
    public_key: object
    key_id: str


def make_api_key(directory: Path, name: str = "api_key.pem") -> ApiKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = directory / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return ApiKey(path, key.public_key(), f"{TENANCY}/{USER}/{FINGERPRINT}")


@pytest.fixture
def api_key(tmp_path) -> ApiKey:
    return make_api_key(tmp_path)


@pytest.fixture
async def fake_oci(api_key):
    server = FakeOciServer(compartment=COMPARTMENT)
    server.keys[api_key.key_id] = api_key.public_key
    runner, port = await serve_app(server.app())
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()
