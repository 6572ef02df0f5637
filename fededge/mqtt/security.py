"""Authentication and TLS of a paho client from ``BrokerSettings``, and readable connect errors."""

from __future__ import annotations

import socket
import ssl

import paho.mqtt.client as paho

from fededge.errors import ConfigError
from fededge.settings import BrokerSettings

# What to check when the broker refuses a CONNECT, by paho's name of the reason code.
HINTS = {
    "Bad user name or password": "check broker.username and broker.password",
    "Not authorized": "the broker refuses this client/user (credentials or ACL)",
    "Client identifier not valid": "the broker rejects this client id",
    "Server unavailable": "the broker is not accepting connections",
    "Unsupported protocol version": "try broker.protocol = '3.1.1'",
}


def configure_auth_and_tls(client: paho.Client, b: BrokerSettings) -> None:
    """Set username/password and the TLS context (CA, client certificate) on ``client``."""
    if b.password is not None and b.username is None:
        raise ConfigError("broker.password is set but broker.username is not")
    if b.username is not None:
        pw = b.password.get_secret_value() if b.password is not None else None
        client.username_pw_set(b.username, pw)
    tls_files = {"ca_file": b.ca_file, "cert_file": b.cert_file, "key_file": b.key_file}
    if not b.tls:
        if given := [k for k, v in tls_files.items() if v is not None]:
            raise ConfigError(
                f"broker.{given[0]} is set but broker.url = {b.url!r} is not TLS; "
                "use mqtts://host:port"
            )
        return
    if b.key_file is not None and b.cert_file is None:
        raise ConfigError("broker.key_file is set but broker.cert_file is not")
    try:
        ctx = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
        if b.cert_file is not None:
            ctx.load_cert_chain(str(b.cert_file), str(b.key_file) if b.key_file else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"broker TLS files cannot be used: {e}") from None
    client.tls_set_context(ctx)
    # Quirk: paho 2.2 checks the host name itself with ssl.match_hostname (removed in
    # Python 3.12) unless the context does; tls_insecure_set keeps context.check_hostname
    # and paho's flag in step, so the context always does the check when one is wanted.
    client.tls_insecure_set(b.tls_insecure)


def refusal(addr: str, reason_name: str) -> str:
    """The message for a CONNACK that refused us, with a hint of what to check."""
    msg = f"broker {addr} refused the connection: {reason_name}"
    hint = HINTS.get(reason_name, "")
    return msg + (f" ({hint})" if hint else "")


def describe_connect_error(e: Exception, addr: str, timeout: float) -> str:
    """What an exception from paho's ``connect`` means, in words a person can act on."""
    where = f"MQTT broker {addr}"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS failure with {where}: certificate rejected ({e.verify_message})"
    if isinstance(e, ssl.SSLError):
        return f"TLS failure with {where}: {e}"
    if isinstance(e, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s connecting to {where}"
    if isinstance(e, ConnectionRefusedError):
        return f"{where} is unreachable: connection refused (is the broker running?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host of {where}: {e.strerror}"
    if isinstance(e, OSError):
        return f"{where} is unreachable: {e.strerror or e}"
    return f"cannot connect to {where}: {type(e).__name__}: {e}"
