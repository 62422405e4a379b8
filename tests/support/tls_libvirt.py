"""libvirt's qemu+tls:// transport to the real libvirtd, through a TLS listener of our own.

libvirtd speaks TLS itself only when started with --listen and certificates in its
config, which would change the one system libvirtd every test shares. So, as the sshd
of tests/support/sshd.py does for qemu+ssh://, the listener is ours: a loopback socket
on port 0 whose connections are TLS (the server certificate names 127.0.0.1, a client
certificate from the same CA is required) and whose plaintext goes to libvirtd's unix
socket. The client side is libvirt's own: it checks the server's certificate and name
and presents its client certificate from the URI's `pkipath` directory.

The certificates (a CA, the server's, the client's) are made with openssl under a new
private directory; `other_ca()` gives a client directory that trusts a different CA,
for the test of a server the client must refuse.
"""
from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import threading
from pathlib import Path

LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path) -> None:
    """cakey.pem and cacert.pem in `directory`."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "cakey.pem", "-out", "cacert.pem", "-days", "2",
             "-subj", "/CN=hypersdk test CA", cwd=directory)


def issue(ca: Path, directory: Path, stem: str, subject: str, extensions: str) -> None:
    """`stem`key.pem and `stem`cert.pem in `directory`, signed by the CA in `ca`."""
    (directory / f"{stem}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{stem}key.pem", "-out", f"{stem}.csr", "-subj", subject,
             cwd=directory)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca / "cacert.pem"),
             "-CAkey", str(ca / "cakey.pem"), "-CAcreateserial", "-days", "2",
             "-extfile", f"{stem}.ext", "-out", f"{stem}cert.pem", cwd=directory)


class TlsLibvirt:
    """A TLS listener on a loopback port in front of libvirtd, certificates under `base`
    (a new directory only root can read)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        os.chmod(base, 0o700)
        self.pki = base / "client"  # the client's pkipath: cacert, clientcert, clientkey
        self.pki.mkdir()
        make_ca(base)
        issue(base, base, "server", "/CN=127.0.0.1",
              "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        issue(base, self.pki, "client", "/CN=hypersdk-test-client",
              "extendedKeyUsage=clientAuth\n")
        (self.pki / "cacert.pem").write_bytes((base / "cacert.pem").read_bytes())
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                   cafile=str(base / "cacert.pem"))
        self._context.verify_mode = ssl.CERT_REQUIRED
        # no TLS 1.3 session tickets: libvirt's client reads its confirmation byte once
        # the socket is readable, and a ticket arriving first fails that read (EAGAIN)
        self._context.num_tickets = 0
        self._context.load_cert_chain(base / "servercert.pem", base / "serverkey.pem")
        self.handshakes = 0  # connections whose TLS handshake succeeded
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._relay, "127.0.0.1", 0, ssl=self._context))
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def uri(self, pki: Path | None = None) -> str:
        return f"qemu+tls://127.0.0.1:{self.port}/system?pkipath={pki or self.pki}"

    def other_ca(self) -> Path:
        """A client pkipath whose CA and certificate are not this server's."""
        other = self.base / "other"
        other.mkdir()
        make_ca(other)
        issue(other, other, "client", "/CN=someone-else", "extendedKeyUsage=clientAuth\n")
        return other

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection whose TLS handshake succeeded: its plaintext to and from libvirtd's
        unix socket (a client without a certificate of this CA never gets here). libvirt's
        TLS transport first sends one byte saying the client's certificate was accepted, as
        libvirtd does after its own check."""
        self.handshakes += 1
        writer.write(b"\x01")
        daemon_reader, daemon_writer = await asyncio.open_unix_connection(LIBVIRT_SOCKET)
        self._open.update((writer, daemon_writer))
        await asyncio.gather(_pump(reader, daemon_writer), _pump(daemon_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in self._open:
                writer.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _pump(source: asyncio.StreamReader, dest: asyncio.StreamWriter) -> None:
    """Copy until `source` ends, then close `dest`."""
    try:
        while data := await source.read(65536):
            dest.write(data)
            await dest.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        dest.close()
