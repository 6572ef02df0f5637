"""A private Mosquitto for tests: its own port, config, persistence and log in a temp folder.

``Mosquitto(workdir, extra_config=[...])`` writes a config (the caller adds or overrides lines),
starts ``mosquitto`` on a free port, and can stop, kill -9 and restart it on the same port and
database; ``wait_log`` waits for a line in its log. The pytest fixtures (``broker``,
``fresh_broker``, ``mosquitto_factory``) are in :mod:`fededge.testing.pytest_plugin`. The helpers
here also build TLS files (with ``cryptography``) and password files (``mosquitto_passwd``).

Needs the ``mosquitto`` binary (``apt-get install mosquitto``); no pytest.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fededge.settings import BrokerSettings
from fededge.testing import wait_until

__all__ = [
    "Mosquitto",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "make_password_file",
    "make_tls_files",
    "wait_port",
]

START_TIMEOUT = 30.0  # a ceiling for a loaded machine; it starts in milliseconds


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("mosquitto", path=path)


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """Poll until something accepts TCP connections on host:port; False after ``timeout``."""

    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        return wait_until(accepts, timeout, f"a listener on {host}:{port}")
    except TimeoutError:
        return False


class Mosquitto:
    """One private mosquitto process that can be stopped, killed and started again.

    ``extra_config`` lines are appended to the generated config (``config_path``); ``listener``
    lines add listeners, and ``start`` waits until every one accepts connections.

    The port, config, persistence file and log stay the same across restarts, so clients
    can reconnect and (after a clean ``stop``) find their sessions. ``kill`` is a crash:
    Mosquitto only writes its database on shutdown or every ``autosave_interval`` seconds.
    ``env`` is added to the broker's environment (``fededge.memory.BROKER_MALLOC_ENV``: the
    allocator settings docs/operations.md recommends for large models).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        extra_config: Sequence[str] = (),
        allow_anonymous: bool = True,
        max_queued_messages: int = 1000,
        max_inflight_messages: int = 20,
        max_packet_size: int = 128 * 1024 * 1024,
        autosave_interval: int | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("the mosquitto binary is not installed")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.stderr_path = workdir / "stderr.txt"
        lines = [
            # Started as root, Mosquitto drops privileges to user "mosquitto", which cannot
            # read pytest's 0700 temp folders nor write the log and database there; "user
            # root" keeps the current user (it is ignored when not started as root).
            "user root",
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            f"max_queued_messages {max_queued_messages}",
            f"max_inflight_messages {max_inflight_messages}",
            # message_size_limit is deprecated in Mosquitto 2.0; max_packet_size replaces it
            # and counts the whole packet (64 MiB payloads plus headers fit).
            f"max_packet_size {max_packet_size}",
            "set_tcp_nodelay true",
        ]
        if autosave_interval is not None:
            lines.append(f"autosave_interval {autosave_interval}")
        lines.extend(extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")
        # Every listener must be up before a test may use it.
        self.listeners = [
            (ln.split()[2] if len(ln.split()) > 2 else "127.0.0.1", int(ln.split()[1]))
            for ln in lines
            if ln.startswith("listener ")
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        #: Added to the broker process's environment, e.g. ``BROKER_MALLOC_ENV`` (memory.py).
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        """mqtt://127.0.0.1:PORT of the plain listener."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settings(self, **overrides: Any) -> BrokerSettings:
        """BrokerSettings for this broker, with fast reconnects suited to tests."""
        values: dict[str, Any] = {
            "url": self.url,
            "connect_timeout": 5.0,
            "reconnect_min_delay": 0.1,
            "reconnect_max_delay": 1.0,
        }
        values.update(overrides)
        return BrokerSettings(**values)

    def start(self) -> None:
        """Start mosquitto and wait until every listener accepts connections."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + START_TIMEOUT
        for host, port in self.listeners:
            while not wait_port(port, 0.2, host):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not start listening on port {port}:\n"
                        f"{self.stderr_path.read_text(errors='replace')}\n{self.log_text()}"
                    )

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: sessions and retained messages are saved)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Crash it (SIGKILL): whatever was not autosaved is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Clean stop, then start on the same port with the same database."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Everything mosquitto has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 30.0) -> bool:
        """Wait until the log contains ``text``; False after ``timeout`` (a loaded-machine ceiling)."""
        try:
            return wait_until(lambda: text in self.log_text(), timeout, repr(text))
        except TimeoutError:
            return False


# --- TLS and authentication material ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A private CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def listener(
        self, port: int, *, host: str = "127.0.0.1", require_certificate: bool = True
    ) -> list[str]:
        """Mosquitto config lines for a TLS listener on host:port using these files."""
        return [
            f"listener {port} {host}",
            f"cafile {self.ca_cert}",
            f"certfile {self.server_cert}",
            f"keyfile {self.server_key}",
            f"require_certificate {'true' if require_certificate else 'false'}",
        ]


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a CA, a server and a client certificate (ECDSA P-256) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("fededge test CA", ca_key, None, ca_key, ca=True)
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for subject, cert_path, key_path, server in [
        ("localhost", files.server_cert, files.server_key, True),
        ("fededge-client", files.client_cert, files.client_key, False),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(subject, key, ca.subject, ca_key, server=server)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    return files


def make_password_file(directory: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by ``mosquitto_passwd`` (FileNotFoundError if absent)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    tool = shutil.which("mosquitto_passwd", path=path)
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    pwfile = directory / "passwords"
    pwfile.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(pwfile), user, password], check=True, capture_output=True)
    return pwfile
