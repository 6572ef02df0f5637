"""fededge.systemd against real AF_UNIX datagram sockets, and the shipped units against systemd."""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fededge import systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket in tmp_path, advertised through NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.watchdog() is False
    assert systemd.Watchdog().tick() is False


def test_ready_reaches_a_path_socket_as_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.ready("serving version 3") is True
    assert _recv(notify_socket) == "READY=1\nSTATUS=serving version 3"


def test_each_helper_sends_its_assignment(notify_socket: socket.socket) -> None:
    systemd.status("two\nlines")
    assert _recv(notify_socket) == "STATUS=two lines"
    systemd.watchdog()
    assert _recv(notify_socket) == "WATCHDOG=1"
    systemd.stopping("SIGTERM")
    assert _recv(notify_socket) == "STOPPING=1\nSTATUS=SIGTERM"
    systemd.extend_timeout(2.5)
    assert _recv(notify_socket) == "EXTEND_TIMEOUT_USEC=2500000"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fededge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(30.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=abstract") is True
        assert _recv(sock) == "READY=1\nSTATUS=abstract"


def test_notify_failures_are_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("line", ["READY", "STATUS=a\nREADY=1"])
def test_notify_rejects_malformed_lines(line: str, notify_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="KEY=value"):
        systemd.notify(line)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("500000", "1", None),  # another process's watchdog
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("500000", "x", None),
        ("", None, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    usec: str, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval() == expected


def test_watchdog_interval_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    assert not systemd.Watchdog().enabled


def test_watchdog_tick_pings_at_most_every_third_of_the_timeout() -> None:
    now = [100.0]
    sent: list[float] = []

    def send() -> bool:
        sent.append(now[0])
        return True

    dog = systemd.Watchdog(3.0, clock=lambda: now[0], send=send)
    assert dog.poll_timeout(5.0) == 1.0
    assert dog.poll_timeout(0.2) == 0.2
    for t in (100.0, 100.5, 100.99, 101.0, 101.5, 102.0, 104.5):
        now[0] = t
        dog.tick()
    assert sent == [100.0, 101.0, 102.0, 104.5]


def test_watchdog_reads_the_environment_and_sends(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "900000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = systemd.Watchdog()
    assert dog.interval == 0.9
    assert dog.tick() is True
    assert _recv(notify_socket) == "WATCHDOG=1"
    assert dog.tick() is False  # rate-limited


def test_watchdog_rejects_a_nonpositive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        systemd.Watchdog(0.0)


def test_sigterm_becomes_a_request_checked_at_a_safe_point() -> None:
    # What was there before (SIGINT is ignored, not Python's handler, under a background shell).
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    shutdown = systemd.install_signal_handlers()
    try:
        shutdown.check()  # nothing requested yet
        work: queue.Queue[int] = queue.Queue()
        os.kill(os.getpid(), signal.SIGTERM)
        # The handler ran (in this thread) without raising; a blocking get still times out.
        with pytest.raises(queue.Empty):
            work.get(timeout=0.05)
        assert shutdown.requested
        assert shutdown.wait(0) is True
        with pytest.raises(systemd.ShutdownRequested) as info:
            shutdown.check()
        assert info.value.signum == signal.SIGTERM
        assert info.value.signal_name == "SIGTERM"
        # A second signal means "now": it raises straight from the handler.
        with pytest.raises(systemd.ShutdownRequested, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)  # interrupted at once by the raising handler
    finally:
        shutdown.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_shutdown_can_be_requested_without_signals() -> None:
    # The demo runs daemons in threads: no signal handlers there, the harness requests stops.
    shutdown = systemd.Shutdown()
    assert not shutdown.wait(0.01)
    shutdown.request()
    with pytest.raises(systemd.ShutdownRequested, match="SIGTERM"):
        shutdown.check()


def test_import_installs_no_signal_handler() -> None:
    code = (
        "import signal; before = signal.getsignal(signal.SIGTERM); import fededge.systemd; "
        "assert signal.getsignal(signal.SIGTERM) == before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_handlers_need_the_main_thread() -> None:
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            systemd.install_signal_handlers()
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


# --- the shipped units -------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install -y systemd)"
)


def _unit_settings(unit: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, e.g. SystemCallFilter=)."""
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _verify(unit_text: str, name: str, tmp_path: Path) -> str:
    """Run ``systemd-analyze verify`` on a copy whose ExecStart binary exists; its output."""
    assert SYSTEMD_ANALYZE is not None
    fake = tmp_path / "bin" / "fededge"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert "ExecStart=/usr/bin/fededge " in unit_text
    copy = tmp_path / name
    copy.write_text(unit_text.replace("ExecStart=/usr/bin/fededge ", f"ExecStart={fake} "))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    # verify exits 0 even when it ignored a line it could not parse: the output is the verdict.
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        output += f"\n(exit code {result.returncode})"
    return output


def test_every_unit_ships() -> None:
    assert [u.name for u in UNITS] == [
        "fededge-aggregator.service",
        "fededge-device.service",
        "fededge-gateway.service",
    ]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify_without_a_warning(unit: Path, tmp_path: Path) -> None:
    output = _verify(unit.read_text(), unit.name, tmp_path)
    assert output == "", output


@needs_analyze
def test_verify_check_does_catch_a_bad_line(tmp_path: Path) -> None:
    # Guards the test above: a typo must show up in the output although the exit code is 0.
    text = (ROOT / "systemd" / "fededge-device.service").read_text()
    output = _verify(text.replace("Type=notify", "Type=notfy"), "fededge-device.service", tmp_path)
    assert "Failed to parse service type" in output


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_speak_the_notify_protocol_and_are_sandboxed(unit: Path) -> None:
    s = _unit_settings(unit)
    role = unit.stem.removeprefix("fededge-")
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "DynamicUser": ["yes"],
        "ProtectSystem": ["strict"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "KillSignal": ["SIGTERM"],
        "StateDirectory": [f"fededge/{role}"],
        "ExecStart": [f"/usr/bin/fededge {role} --config /etc/fededge/{role}.toml"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, key
    assert "@system-service" in s["SystemCallFilter"]


def test_aggregator_unit_caches_numba_kernels_and_allows_the_jit() -> None:
    s = _unit_settings(ROOT / "systemd" / "fededge-aggregator.service")
    assert s["CacheDirectory"] == ["fededge"]
    assert "NUMBA_CACHE_DIR=%C/fededge/numba" in s["Environment"]
    assert s["MemoryDenyWriteExecute"] == ["no"]


def test_device_unit_exposes_the_api_socket_to_the_fededge_group() -> None:
    s = _unit_settings(ROOT / "systemd" / "fededge-device.service")
    assert s["RuntimeDirectory"] == ["fededge"]
    assert s["SupplementaryGroups"] == ["fededge"]
    assert s["MemoryDenyWriteExecute"] == ["yes"]
    assert "PrivateUsers" not in s  # would unmap the fededge group


# --- W^X (MemoryDenyWriteExecute=) evidence ------------------------------------------------------

# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux >= 6.3) is the rule systemd's
# MemoryDenyWriteExecute= enforces (systemd >= 254 uses it; older ones a seccomp filter).
_MDWE_PRELUDE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit(77)
"""


def _run_under_mdwe(code: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PRELUDE + code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    return result


def test_litert_trains_and_infers_under_write_xor_execute() -> None:
    pytest.importorskip("ai_edge_litert")
    result = _run_under_mdwe(
        """
import numpy as np
from fededge.device.bundle import load_bundle, shipped_bundle_path
from fededge.device.runtime import ModelRuntime
for name in ("digits_mlp", "digits_cnn"):
    b = load_bundle(shipped_bundle_path(name))
    rt = ModelRuntime.from_bundle(b, num_threads=2)
    x = np.random.default_rng(0).random((16, *b.spec.input_shape), dtype=np.float32)
    loss, w = rt.train_step(x, np.zeros(16, dtype=np.int64), 0.05, b.weights)
    assert np.isfinite(loss) and rt.infer(x, w).shape == (16, b.spec.num_classes)
print("ok")
"""
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_numba_needs_writable_executable_memory() -> None:
    # Why fededge-aggregator.service keeps MemoryDenyWriteExecute=no.
    pytest.importorskip("numba")
    result = _run_under_mdwe(
        """
from numba import njit
@njit
def twice(x):
    return 2 * x
twice(1)
"""
    )
    assert result.returncode != 0
    assert "executable memory" in result.stderr


# --- a real process under a fake service manager -----------------------------------------------


@dataclass
class NotifyCapture:
    """A process started with NOTIFY_SOCKET/WATCHDOG_USEC, and the datagrams it sent."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    started: float = field(default_factory=time.monotonic)
    messages: list[tuple[float, str]] = field(default_factory=list)

    def collect(self, until: float) -> None:
        """Receive datagrams until ``until`` (monotonic) or until the process exits."""
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(min(left, 0.1))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if self.process.poll() is not None:
                    return
                continue
            self.messages.append((time.monotonic() - self.started, data.decode()))

    def wait_for(self, line: str, timeout: float, *, count: int = 1, after: float = 0.0) -> float:
        """Collect until ``count`` datagrams received at or after ``after`` (seconds since
        start) contain ``line``; when the last of them arrived. ``timeout`` is a ceiling."""

        def arrived() -> list[float]:
            return [t for t in self.times(line) if t >= after][count - 1 : count]

        deadline = time.monotonic() + timeout
        while not arrived():
            if self.process.poll() is not None:
                self.collect(time.monotonic() + 0.2)  # what it sent before it exited
                if not arrived():
                    break
            elif time.monotonic() > deadline:
                break
            self.collect(min(deadline, time.monotonic() + 0.2))
        if found := arrived():
            return found[0]
        raise AssertionError(
            f"not {count} x {line!r} within {timeout}s (exit code {self.process.poll()}); "
            f"got {self.messages}"
        )

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.split("\n")]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, keep collecting until exit; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.collect(time.monotonic() + 0.1)
        self.collect(time.monotonic() + 0.1)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"no exit {timeout}s after SIGTERM; got {self.messages}")
        return self.process.returncode


@pytest.fixture
def notified(tmp_path: Path) -> Iterator[Callable[..., NotifyCapture]]:
    """Start a command as systemd would start a Type=notify service with WatchdogSec=."""
    captures: list[NotifyCapture] = []
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))

    def start(
        cmd: Sequence[str], *, watchdog_usec: int = 600_000, env: dict[str, str] | None = None
    ) -> NotifyCapture:
        full_env = {**os.environ, **(env or {})}
        full_env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC=str(watchdog_usec))
        full_env.pop("WATCHDOG_PID", None)  # systemd sets it to the child's pid; unset is valid
        proc = subprocess.Popen(list(cmd), env=full_env, stdout=subprocess.DEVNULL)
        capture = NotifyCapture(proc, sock)
        captures.append(capture)
        return capture

    yield start
    for capture in captures:
        if capture.process.poll() is None:
            capture.process.kill()
            capture.process.wait()
    sock.close()


# The protocol seen from the outside, with the same loop shape the daemons use.
_LOOP = """
import queue, sys
from fededge import systemd
shutdown = systemd.install_signal_handlers()
dog = systemd.Watchdog()
systemd.ready("looping")
work = queue.Queue()
try:
    while True:
        shutdown.check()
        try:
            work.get(timeout=dog.poll_timeout(1.0))
        except queue.Empty:
            pass
        dog.tick()
except systemd.ShutdownRequested as e:
    systemd.stopping(e.signal_name)
    sys.exit(0)
"""


def test_a_main_loop_reports_ready_pings_and_stops_on_sigterm(
    notified: Callable[..., NotifyCapture],
) -> None:
    run = notified([sys.executable, "-c", _LOOP], watchdog_usec=600_000)
    ready_at = run.wait_for("READY=1", timeout=60)
    # Pings keep coming from the running loop. Their spacing (at most one per third of the
    # timeout) is tested with a fake clock above: measured here, under load, it would be the
    # scheduling of this test process, not the loop's behaviour.
    run.wait_for("WATCHDOG=1", timeout=60, count=3, after=ready_at)
    assert run.terminate() == 0
    assert "STOPPING=1\nSTATUS=SIGTERM" in [m for _, m in run.messages]


def _daemon_cmd(role: str, *args: str) -> list[str]:
    if importlib.util.find_spec(f"fededge.cli.{role}") is None:
        pytest.skip(f"`fededge {role}` does not exist yet")
    return [sys.executable, "-m", "fededge.cli", role, *args]


@pytest.mark.broker
def test_aggregator_daemon_speaks_sd_notify(
    notified: Callable[..., NotifyCapture], broker: Any, tmp_path: Path
) -> None:
    import numpy as np
    from aggtools import init_task, make_settings

    from fededge.protocol import Plan

    state = tmp_path / "state"
    settings = make_settings(broker.url, state)
    init_task(settings, {"w": np.zeros(64, np.float32)}, Plan())
    cmd = _daemon_cmd(
        "aggregator",
        *("--broker", broker.url, "--task", settings.task, "--state-dir", str(state)),
        *("--wait-for-model", "60"),
    )
    run = notified(cmd, watchdog_usec=1_500_000, env={"FEDEDGE_AGGREGATOR__METRICS": "false"})
    ready_at = run.wait_for("READY=1", timeout=120)  # a cold Numba cache compiles first
    # Pinged from the running main loop (the spacing is tested with a fake clock above).
    run.wait_for("WATCHDOG=1", timeout=60, count=3, after=ready_at)
    assert run.terminate() == 0
    assert any(m.startswith("STOPPING=1") for _, m in run.messages), run.messages
