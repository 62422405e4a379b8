"""`FakeWinRMServer` (fake_winrm.py) on 127.0.0.1: Basic auth over HTTP, or over HTTPS."""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ..support.servers import serve_app
from .fake_winrm import FakeWinRMServer

USER = "HV\\exporter"
PASSWORD = "s3cret-Passw0rd"


@pytest.fixture
async def fake_winrm():
    server = FakeWinRMServer(username=USER, password=PASSWORD)
    runner, port = await serve_app(server.app())
    server.url = f"127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway certificate for `host` (also its own CA); returns (cert, key) paths."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "host.pem", directory / "host.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def fake_winrm_tls(tmp_path):
    """The same fake behind HTTPS with a self-signed certificate; `.ca_file` trusts it."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = FakeWinRMServer(username=USER, password=PASSWORD)
    runner, port = await serve_app(server.app(), context)
    server.url = f"127.0.0.1:{port}"
    server.ca_file = str(cert)
    yield server
    await runner.cleanup()
