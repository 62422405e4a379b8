"""The real OpenSSH server on a loopback port of its own, for libvirt's qemu+ssh:// transport.

sshd cannot listen on port 0 and say which port it got, so the listener is ours: a
loopback socket bound to port 0 whose connections each get `sshd -i` (inetd mode, the
real server speaking SSH on the accepted socket). Its host key, the client's key and the
authorized_keys file are made in a private directory; only public-key logins of the one
allowed user are accepted. The client's host-key check is real too: the URI names an
ssh wrapper (libvirt's `command=` parameter) that reads the server's key from a
known_hosts file of its own, so nothing is added to root's ~/.ssh.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it


class LoopbackSshd:
    """sshd for `user` with fresh keys under `base`: a new directory only root can change,
    on a path only root can change (sshd's StrictModes refuses /tmp's subdirectories)."""

    def __init__(self, base: Path, user: str = "root") -> None:
        self.base = base
        self.user = user
        self.keyfile = base / "id_ed25519"
        self._children: list[subprocess.Popen] = []
        self._log = open(base / "sshd.log", "ab")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._write_keys_and_config()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _write_keys_and_config(self) -> None:
        os.chmod(self.base, 0o700)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for key in (self.base / "host_key", self.keyfile):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        host_key = (self.base / "host_key.pub").read_text().split()[:2]
        (self.base / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")
        self.ssh = self.base / "ssh"
        self.ssh.write_text("#!/bin/sh\nexec ssh -o StrictHostKeyChecking=yes -o "
                            f"UserKnownHostsFile={self.base / 'known_hosts'} \"$@\"\n")
        self.ssh.chmod(0o700)
        authorized = self.base / "authorized_keys"
        authorized.write_bytes(self.keyfile.with_suffix(".pub").read_bytes())
        authorized.chmod(0o600)
        (self.base / "sshd_config").write_text(
            f"HostKey {self.base / 'host_key'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"AllowUsers {self.user}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PidFile none\nLogLevel VERBOSE\n")

    def _serve(self) -> None:
        while True:
            try:
                conn, _peer = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                self._children.append(subprocess.Popen(
                    [SSHD, "-i", "-e", "-f", str(self.base / "sshd_config")],
                    stdin=conn, stdout=conn, stderr=self._log))

    def uri(self, path: str = "/system", **params: str) -> str:
        """A qemu+ssh:// URI through this server with its key and known_hosts."""
        query = {"keyfile": str(self.keyfile), "command": str(self.ssh), "no_tty": "1",
                 **params}
        return (f"qemu+ssh://{self.user}@127.0.0.1:{self.port}{path}?"
                + "&".join(f"{k}={v}" for k, v in query.items()))

    def connections(self) -> int:
        """How many SSH connections were accepted so far."""
        return len(self._children)

    def stop(self) -> None:
        # shutdown wakes the accept() blocked in _serve; close alone would not, and the
        # thread would go on accepting on the fd number the next server's listener gets
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the sshd listener thread did not stop"
        for child in self._children:
            if child.poll() is None:
                child.terminate()
                child.wait(timeout=10)
        self._log.close()
