"""The local API on a Unix socket: the happy path and hostile requests, the server surviving."""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from devtools import (
    DIGITS_PLAN,
    UnixHTTPConnection,
    call,
    device_settings,
    digits_split,
    mlp_bundle,
    new_task,
    publish_task,
)

from fededge.device.api import ApiServer
from fededge.device.client import Client
from fededge.errors import ConfigError
from fededge.testing import wait_until

pytestmark = pytest.mark.broker
CHUNKED = b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"


def raw_exchange(path: Path, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, half-close, return everything the server answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture(scope="module")
def api(broker, tmp_path_factory) -> Iterator[tuple[ApiServer, Client]]:
    tmp = tmp_path_factory.mktemp("api")
    task = new_task()
    s = device_settings(broker.url, tmp, task, "apidev")
    publish_task(s, DIGITS_PLAN.model_copy(update={"examples_per_update": 1000}))
    client = Client(s, bundle=mlp_bundle())
    client.start()
    assert client.wait_for_version(0, 20)
    server = ApiServer(client, tmp / "api.sock", max_request_bytes=64 * 1024,
                       read_timeout=0.5, request_deadline=1.5, max_connections=8)  # fmt: skip
    server.start()
    yield server, client
    server.close()
    client.close()
    assert not (tmp / "api.sock").exists()


def _alive(server: ApiServer) -> None:
    code, body = call(server.path, "GET", "/status")
    assert code == 200 and body["version"] == 0
    assert server.alive


def test_happy_path(api) -> None:
    server, client = api
    (part,), x_te, _ = digits_split(1)
    code, body = call(server.path, "POST", "/predict", {"x": x_te[:3].tolist()})
    assert code == 200 and body["version"] == 0
    np.testing.assert_allclose(body["probs"], client.predict(x_te[:3]), rtol=1e-6)
    before = client.examples.count()
    code, body = call(
        server.path, "POST", "/examples", {"x": part[0][:5].tolist(), "y": part[1][:5].tolist()}
    )
    assert code == 200 and body["added"] == 5 and body["fresh"] >= 5
    assert client.examples.count() == before + 5
    code, body = call(server.path, "GET", "/status")
    assert code == 200 and body["device"] == "apidev" and body["fresh"] >= 5
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o660


def test_keep_alive_serves_several_requests(api) -> None:
    server, _ = api
    conn = UnixHTTPConnection(server.path)
    for _ in range(3):
        conn.request("GET", "/status")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["device"] == "apidev"
    conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(api) -> None:
    server, _ = api
    body = json.dumps({"x": [[0.5] * 64]})
    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(server.path), "-d", body, "http://x/predict"],
        capture_output=True, check=True, timeout=10,
    )  # fmt: skip
    assert len(json.loads(out.stdout)["probs"][0]) == 10


@pytest.mark.parametrize(
    ("method", "url", "body", "code", "reason"),
    [
        ("POST", "/predict", b"{not json", 400, "bad_json"),
        ("POST", "/predict", b"\xff\xfe\x00", 400, "bad_json"),
        ("POST", "/predict", b"[1, 2]", 400, "bad_request"),
        ("POST", "/predict", {"y": [1]}, 400, "bad_request"),
        ("POST", "/predict", {"x": [[1, 2]]}, 400, "bad_shape"),
        ("POST", "/predict", {"x": [[0.5] * 63, [0.5] * 64]}, 400, "bad_shape"),
        ("POST", "/predict", {"x": "zeros"}, 400, "bad_type"),
        ("POST", "/predict", {"x": []}, 400, "bad_shape"),
        ("POST", "/predict", b'{"x": [[NaN' + b", 0" * 63 + b"]]}", 400, "non_finite"),
        ("POST", "/predict", b'{"x": [[1e400' + b", 0" * 63 + b"]]}", 400, "non_finite"),
        ("POST", "/predict", b"[" * 100_000 + b"]" * 100_000, 413, "too_large"),
        ("POST", "/predict", b"[" * 30_000 + b"]" * 30_000, 400, "bad_json"),
        # Python refuses to convert integers of over 4300 digits (a ValueError, not a 500).
        ("POST", "/predict", b'{"x": [[' + b"9" * 5000 + b", 0" * 63 + b"]]}", 400, "bad_json"),
        (
            "POST",
            "/examples",
            b'{"x": [[0' + b", 0" * 63 + b']], "y": [' + b"1" * 4301 + b"]}",
            400,
            "bad_json",
        ),
        ("POST", "/predict", b'{"x": [[' + b"9" * 4000 + b", 0" * 63 + b"]]}", 400, "bad_type"),
        ("POST", "/examples", {"x": [[0.5] * 64], "y": [10**400]}, 400, "bad_label"),
        ("POST", "/examples", {"x": [[0.5] * 64], "y": [10]}, 400, "bad_label"),
        ("POST", "/examples", {"x": [[0.5] * 64], "y": [1, 2]}, 400, "bad_shape"),
        ("POST", "/examples", {"x": [[0.5] * 64], "y": ["1"]}, 400, "bad_label"),
        ("POST", "/examples", {"x": [[True] * 64], "y": [1]}, 400, "bad_type"),
        ("GET", "/predict", None, 405, "method_not_allowed"),
        ("DELETE", "/status", None, 405, "method_not_allowed"),
        ("GET", "/../../etc/passwd", None, 404, "not_found"),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(api, method, url, body, code, reason) -> None:
    server, _ = api
    got, answer = call(server.path, method, url, body)
    assert (got, answer["error"]) == (code, reason), answer
    assert answer["detail"]
    _alive(server)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\xffgarbage\r\n\r\n", b" 400 "),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", b" 400 "),  # short body
        (b"POST /predict HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", b" 400 "),
        (b"POST /predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", b" 400 "),
        (b"POST /predict HTTP/1.1\r\n\r\n{}", b" 411 "),
        (CHUNKED, b" 411 "),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}garbage-after", b" 400 "),
        (b"GET /status HTTP/1.1\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n", b" 431 "),
        (b"BREW /status HTTP/1.1\r\n\r\n", b" 501 "),
    ],
)
def test_malformed_http_is_refused(api, request_bytes, status) -> None:
    server, _ = api
    out = raw_exchange(server.path, request_bytes)
    assert status in out.split(b"\r\n", 1)[0], out[:200]
    _alive(server)


def test_huge_body_refused_without_reading_it(api) -> None:
    server, _ = api
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b"POST /examples HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n" + b"[" * 1000)
        answer = b""
        while b"too_large" not in answer:  # arrives although 999,999,000 bytes never were sent
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
        assert b" 413 " in answer.split(b"\r\n", 1)[0]
    _alive(server)


def test_slow_clients_are_cut_off(api) -> None:
    """A stalled client and one that trickles bytes are both disconnected by the server.

    The socket timeouts are ceilings for a loaded machine: the server's own limits (a 0.5 s
    read timeout, a 1.5 s deadline per request) end each connection long before them.
    """
    server, _ = api
    # Stalls mid-headers: the read timeout closes it while others are served.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(server.path))
        s.sendall(b"POST /predict HTTP/1.1\r\nContent-Le")
        _alive(server)  # others are served meanwhile
        assert s.recv(100) == b""
    # Trickles a byte every 0.3 s (each read within the timeout): only the deadline ends it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(server.path))
        s.sendall(b"POST /predict HTTP/1.1\r\nX-Slow: ")
        closed = False
        for _ in range(200):  # 60 s of trickling at most, a ceiling
            try:
                s.sendall(b"a")
            except OSError:
                closed = True
                break
            time.sleep(0.3)  # pacing the trickle, not waiting for a result
        if not closed:
            try:
                closed = s.recv(100) == b""
            except OSError:
                closed = True
        assert closed
    _alive(server)


def test_connection_limit_answers_503(api) -> None:
    server, _ = api
    socks = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.path))
            socks.append(s)
        wait_until(lambda: server.connections == 8, 10, "8 connections served")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(server.path))
            assert b" 503 " in s.recv(1000).split(b"\r\n", 1)[0]
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: server.connections == 0, 10, "the connections closed")
    _alive(server)


def test_socket_group_and_stale_or_live_socket(broker, tmp_path) -> None:
    task = new_task()
    s = device_settings(broker.url, tmp_path, task, "sockdev")
    client = Client(s, bundle=mlp_bundle())  # not started: the API works without a broker
    path = tmp_path / "run" / "api.sock"
    # A stale socket left by a killed daemon is replaced.
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    group = grp.getgrgid(os.getgid()).gr_name
    server = ApiServer(client, path, mode=0o600, group=group)
    server.start()
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
        code, body = call(path, "POST", "/predict", {"x": [[0.0] * 64]})
        assert code == 503 and body["error"] == "not_ready"
        with pytest.raises(ConfigError, match="another process"):
            ApiServer(client, path)
        with pytest.raises(ConfigError, match="no such group"):
            ApiServer(client, tmp_path / "other.sock", group="no-such-group-xyz")
    finally:
        server.close()
        client.close()
    assert not path.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ApiServer(Client(device_settings(broker.url, tmp_path, task, "d2")), tmp_path / "file")
