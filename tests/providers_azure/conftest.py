"""Azurite (real Blob service, npm) for the downloads; FakeArmServer for the compute calls."""
from __future__ import annotations

import datetime
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from hypersdk.service.config import parse_config
from hypersdk.service.providers.azure import AzureProvider

from ..support.fake_sink import FakeExportSink
from ..support.servers import start_on_any_port
from .fake_arm import SUB, TOKEN, FakeArmServer, FakeArmState

AZURITE_DIR = Path(os.environ.get("HYPERSDK_AZURITE_DIR", "/var/tmp/hypersdk-azurite"))
AZURITE_BIN = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")  # Azurite's published development key
CONTAINER = "vhds"


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """The Azurite blob service on loopback; returns its blob endpoint URL."""
    if not AZURITE_BIN.exists():  # installed by scripts/install-system-deps.sh, not here
        pytest.fail(f"{AZURITE_BIN} is missing: run scripts/install-system-deps.sh")
    workspace = tmp_path_factory.mktemp("azurite")
    proc, port = start_on_any_port([str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", "0",
                                    "--location", str(workspace), "--silent",
                                    "--skipApiVersionCheck", "--disableTelemetry"], "azurite")
    url = f"http://127.0.0.1:{port}/{ACCOUNT}"
    service = BlobServiceClient(url, credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
    service.create_container(CONTAINER)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def upload_disk(azurite_url: str, name: str, data: bytes, page_chunk: int = 64 * 1024) -> None:
    """Put `data` as the page blob behind managed disk `name`, writing only the
    `page_chunk` pieces that hold data (as a cloud disk: unwritten pages stay empty)."""
    service = BlobServiceClient(azurite_url, credential={"account_name": ACCOUNT,
                                                         "account_key": ACCOUNT_KEY})
    blob = service.get_blob_client(CONTAINER, f"{name}.vhd")
    blob.create_page_blob(len(data))
    for offset in range(0, len(data), page_chunk):
        piece = data[offset:offset + page_chunk]
        if any(piece):
            blob.upload_page(piece, offset=offset, length=len(piece))


def sas_url(azurite_url: str, disk: str) -> str:
    """A real read-only SAS URL for the disk's blob, signed with the account key."""
    token = generate_blob_sas(ACCOUNT, CONTAINER, f"{disk}.vhd", account_key=ACCOUNT_KEY,
                              permission=BlobSasPermissions(read=True),
                              expiry=datetime.datetime.now(datetime.timezone.utc)
                              + datetime.timedelta(hours=1))
    return f"{azurite_url}/{CONTAINER}/{disk}.vhd?{token}"


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (server context, CA file for the client)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, str(cert)


class StaticTokenCredential:
    """An async token credential that always hands out one bearer token."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token

    async def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        pass


@pytest.fixture
def arm_state(azurite) -> FakeArmState:
    return FakeArmState(sas_for_disk=lambda disk: sas_url(azurite, disk))


@pytest.fixture
async def arm(arm_state, tls):
    server = FakeArmServer(arm_state, tls[0])
    await server.start()
    yield server
    await server.stop()


def make_provider(arm: FakeArmServer, ca_file: str, token: str = TOKEN, **settings) -> AzureProvider:
    section = {"type": "azure", "subscription_id": SUB, "resource_group": "rg1",
               "arm_endpoint": arm.base_url, "ca_file": ca_file, "poll_interval": "10ms", **settings}
    config = parse_config({"providers": {"azure": section}, "export": {"max_retries": 2}},
                          "(test)", env={})
    return AzureProvider("azure", config.providers["azure"], config,
                         credential=StaticTokenCredential(token))


@pytest.fixture
async def provider(arm, tls):
    made = make_provider(arm, tls[1])
    yield made
    await made.close()


@pytest.fixture
def sink() -> FakeExportSink:
    return FakeExportSink()


@pytest.fixture
def out(tmp_path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def make_vhd(tmp_path: Path, name: str, size: int, pattern: bytes) -> bytes:
    """A fixed VHD made by qemu-img, with `pattern` written at a few offsets of the disk."""
    path = tmp_path / f"{name}.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
                    str(path), str(size)], check=True)
    with open(path, "r+b") as handle:
        for offset in (0, size // 3, size - len(pattern)):
            handle.seek(offset)
            handle.write(pattern)
    return path.read_bytes()
