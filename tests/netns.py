"""Emulated hosts for hardware-in-loop tests: network namespaces on impaired point-to-point links.

Each host is a network namespace whose only interface (``eth0``) is a TUN device; its twin in
the root namespace is routed to it, and a ``DelayLine`` thread moves packets between the two.
The root namespace holds the gateway address (on a port-less bridge) that Mosquitto listens on.

Why TUN and a user-space delay line rather than veth plus ``tc netem``: kernels built without
``CONFIG_NET_SCH_NETEM`` (this project's CI machines among them) answer ``netem`` with
"Specified qdisc kind is unknown". ``Host.impair`` uses netem where the kernel has it and
otherwise the delay line, which adds the same per-direction delay, uniform jitter and random
loss (seeded), keeping each direction in order as a real link does. Everything is real kernel
networking: TCP sees real delay, real loss and retransmits, and ``ip link set eth0 down``
really takes the host's link down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import heapq
import os
import random
import secrets
import select
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
INNER_IFNAME = "eth0"


def _ip() -> str | None:
    return shutil.which(
        "ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command; raise with its stderr if it fails."""
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): not root, no iproute2, ..."""
    if os.geteuid() != 0:
        return "hardware-in-loop tests need root (network namespaces)"
    if _ip() is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (kernel without CONFIG_TUN)"
    probe = f"fe-{secrets.token_hex(3)}-probe"
    try:
        _run("ip", "netns", "add", probe)
    except RuntimeError as e:
        return f"cannot create a network namespace: {e}"
    with contextlib.suppress(RuntimeError):
        _run("ip", "netns", "del", probe)
    return None


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclasses.dataclass(frozen=True)
class Impairment:
    """What a link does to each packet, per direction (the meaning of ``tc netem``'s knobs)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability in [0, 1]

    def netem_args(self) -> list[str]:
        return ["netem", "delay", f"{self.delay_ms:g}ms", f"{self.jitter_ms:g}ms",
                "loss", f"{self.loss * 100:g}%"]  # fmt: skip


class DelayLine:
    """A thread that forwards IP packets between two TUN fds, delaying and dropping them."""

    def __init__(self, a: int, b: int, seed: int) -> None:
        self._peer = {a: b, b: a}
        self._rng = random.Random(seed)
        self._impairment = Impairment()
        self._lock = threading.Lock()
        self._queue: list[tuple[float, int, int, bytes]] = []
        self._last_release = {a: 0.0, b: 0.0}  # per output fd: keeps each direction in order
        self._seq = 0
        self._wake_r, self._wake_w = os.pipe()
        self.forwarded = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"delayline-{a}-{b}", daemon=True)
        self._thread.start()

    def set(self, impairment: Impairment) -> None:
        with self._lock:
            self._impairment = impairment

    def _admit(self, fd: int, packet: bytes, now: float) -> None:
        with self._lock:
            imp = self._impairment
            if imp.loss and self._rng.random() < imp.loss:
                self.dropped += 1
                return
            jitter = self._rng.uniform(-imp.jitter_ms, imp.jitter_ms) if imp.jitter_ms else 0.0
        out = self._peer[fd]
        release = max(now + max(0.0, imp.delay_ms + jitter) / 1000, self._last_release[out])
        self._last_release[out] = release
        self._seq += 1
        heapq.heappush(self._queue, (release, self._seq, out, packet))

    def _run(self) -> None:
        fds = [*self._peer, self._wake_r]
        while True:
            timeout = None
            if self._queue:
                timeout = max(0.0, self._queue[0][0] - time.monotonic())
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in ready:
                return
            now = time.monotonic()
            for fd in ready:
                for _ in range(256):  # drain a burst, but let due packets out in between
                    try:
                        self._admit(fd, os.read(fd, 65536), now)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno != errno.EBADFD:
                            raise
                        break
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, out, packet = heapq.heappop(self._queue)
                try:
                    os.write(out, packet)
                    self.forwarded += 1
                except OSError:
                    # EIO: that end's interface is down; the packet is lost as on a cut cable.
                    self.dropped += 1

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)


class Host:
    """One emulated host: a namespace, its link to the root namespace and the link's impairment."""

    def __init__(self, name: str, address: str, outer: str, line: DelayLine) -> None:
        self.name = name
        self.address = address
        self.outer = outer  # the link's end in the root namespace
        self.line = line
        self.mode = "none"

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this host (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *args]

    def impair(self, impairment: Impairment) -> str:
        """Apply delay/jitter/loss to both directions; return "netem" or "delayline"."""
        try:
            for args in (["ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev",
                          INNER_IFNAME, "root"], ["tc", "qdisc", "replace", "dev", self.outer,
                          "root"]):  # fmt: skip
                _run(*args, *impairment.netem_args())
            self.line.set(Impairment())
            self.mode = "netem"
        except RuntimeError as e:
            if "unknown" not in str(e).lower():
                raise
            self.line.set(impairment)
            self.mode = "delayline"
        return self.mode

    def link_down(self) -> None:
        """Take the host's interface down: nothing gets in or out until ``link_up``."""
        _run("ip", "-n", self.name, "link", "set", INNER_IFNAME, "down")

    def link_up(self) -> None:
        # Bringing it up restores the peer route, which comes from the interface's address.
        _run("ip", "-n", self.name, "link", "set", INNER_IFNAME, "up")


class Network:
    """A private 10.213.N.0/24 with the gateway in the root namespace and hosts in namespaces.

    Use as a context manager: leaving it deletes every namespace and link it made, also when
    the block raised.
    """

    def __init__(self, seed: int = 0) -> None:
        self.tag = f"fe-{secrets.token_hex(3)}"
        self.seed = seed
        self.subnet = self._free_subnet()
        self.gateway = f"10.213.{self.subnet}.1"
        self.bridge = f"{self.tag}-br"
        self.hosts: list[Host] = []
        self._fds: list[int] = []
        self._namespaces: list[str] = []
        self._bridge_made = False

    @staticmethod
    def _free_subnet() -> int:
        used = _run("ip", "-4", "-o", "addr").stdout
        free = [n for n in range(1, 255) if f" 10.213.{n}." not in used]
        if not free:
            raise RuntimeError("no free 10.213.N.0/24 subnet")
        return random.SystemRandom().choice(free)

    def __enter__(self) -> Network:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add_host(self) -> Host:
        """A new namespace at 10.213.N.(11+i) whose eth0 leads to the gateway."""
        i = len(self.hosts) + 1
        name = f"{self.tag}-d{i}"
        address = f"10.213.{self.subnet}.{10 + i}"
        inner, outer = f"{self.tag}-i{i}", f"{self.tag}-t{i}"
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        a = _open_tun(inner)
        self._fds.append(a)
        b = _open_tun(outer)
        self._fds.append(b)
        _run("ip", "link", "set", inner, "netns", name)
        _run("ip", "-n", name, "link", "set", inner, "name", INNER_IFNAME)
        _run("ip", "-n", name, "addr", "add", address, "peer", self.gateway, "dev", INNER_IFNAME)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", name, "link", "set", INNER_IFNAME, "up")
        _run("ip", "link", "set", outer, "up")
        _run("ip", "route", "add", f"{address}/32", "dev", outer, "src", self.gateway)
        host = Host(name, address, outer, DelayLine(a, b, seed=self.seed * 1000 + i))
        self.hosts.append(host)
        return host

    def close(self) -> None:
        """Stop the delay lines, close the TUN fds (which deletes them), delete namespaces."""
        for h in self.hosts:
            h.line.stop()
        self.hosts.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        for name in self._namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._namespaces.clear()
        if self._bridge_made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
            self._bridge_made = False
