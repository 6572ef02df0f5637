"""``fededge status`` and ``fededge watch``: look at a live fleet through the broker.

``status`` reads the task's retained messages (model, plan, aggregator and device statuses,
per-version metrics) for a short, bounded time and prints a summary; ``watch`` prints one
decoded line per message that crosses the broker. Both only subscribe: they never publish, so
they work with a read-only ACL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from fededge.cli.common import quiet_transport, settings_options
from fededge.cli.render import (
    MAX_MESSAGE,
    STYLES,
    console,
    describe,
    describe_aggregator,
    describe_plan,
    fmt_age,
    fmt_num,
    fmt_time,
    human_bytes,
    raw_line,
    sha_short,
)
from fededge.errors import FededgeError, NotReadyError, ProtocolError, SignatureError
from fededge.mqtt import MqttClient, read_retained
from fededge.protocol import (
    AggregatorStatus,
    DeviceStatus,
    ModelVersion,
    Plan,
    Topics,
    VersionMetrics,
    decode_json,
)
from fededge.protocol.messages import flat_size
from fededge.protocol.signing import SignedKind, open_message
from fededge.settings import Settings

DEFAULT_WAIT = 2.0
ONLINE_STATES = ("online", "training")


@dataclass
class Snapshot:
    """What the broker holds for one task, as read by `fededge status`."""

    task: str
    broker: str
    prefix: str
    model: ModelVersion | None = None
    model_bytes: int = 0
    model_sha256: str = ""
    plan: Plan | None = None
    aggregator: AggregatorStatus | None = None
    devices: dict[str, DeviceStatus] = field(default_factory=dict)
    metrics: dict[int, VersionMetrics] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def devices_online(self) -> int:
        return sum(d.state in ONLINE_STATES for d in self.devices.values())

    def lag(self, d: DeviceStatus) -> int | None:
        """Versions the device is behind the retained model (None: no model on either side)."""
        if d.version is None or self.model is None:
            return None
        return max(0, self.model.version - d.version)

    def to_json(self) -> dict[str, Any]:
        """The `status --json` object."""
        m = self.model
        model = None
        if m is not None:
            model = {
                "version": m.version,
                "parent": m.parent,
                "time": m.time,
                "updates": m.updates,
                "examples": m.examples,
                "bytes": self.model_bytes,
                "sha256": self.model_sha256,
                "graph_sha256": m.graph_sha256,
                "tensors": len(m.weights),
                "parameters": flat_size(m.weights),
            }
        return {
            "task": self.task,
            "broker": self.broker,
            "prefix": self.prefix,
            "version": m.version if m is not None else None,
            "model": model,
            "plan": self.plan.model_dump() if self.plan else None,
            "aggregator": self.aggregator.model_dump() if self.aggregator else None,
            "privacy": _privacy_json(self.aggregator),
            "devices_online": self.devices_online,
            "devices_offline": len(self.devices) - self.devices_online,
            "devices": [
                {**d.model_dump(), "lag": self.lag(d)}
                for d in (self.devices[k] for k in sorted(self.devices))
            ],
            "versions": [self.metrics[k].model_dump() for k in sorted(self.metrics)],
            "problems": [{"topic": t, "reason": r} for t, r in self.problems],
        }


def _privacy_json(a: AggregatorStatus | None) -> dict[str, Any] | None:
    """epsilon spent and left at delta (docs/privacy.md); None without DP accounting."""
    if a is None or (a.epsilon is None and a.max_epsilon is None):
        return None
    left = None if a.max_epsilon is None else max(0.0, a.max_epsilon - (a.epsilon or 0.0))
    return {"epsilon": a.epsilon, "delta": a.delta, "max_epsilon": a.max_epsilon,
            "epsilon_left": left, "stopped": a.stopped}  # fmt: skip


def _absorb(snap: Snapshot, topics: Topics, topic: str, payload: bytes) -> None:
    """Fold one retained message into the snapshot; a bad one is recorded, never raised."""
    if not payload:
        return  # a cleared retained message
    try:
        if topic == topics.model:
            body = open_message(payload, SignedKind.MODEL, None).payload  # shown, not verified
            snap.model = ModelVersion.from_bytes(body, max_bytes=MAX_MESSAGE)
            snap.model_bytes = len(payload)
            snap.model_sha256 = hashlib.sha256(payload).hexdigest()
        elif topic == topics.plan:
            snap.plan = decode_json(open_message(payload, SignedKind.PLAN, None).payload, Plan)
        elif topic == topics.aggregator_status:
            snap.aggregator = decode_json(payload, AggregatorStatus)
        elif (v := topics.version_of_metrics(topic)) is not None:
            snap.metrics[v] = decode_json(payload, VersionMetrics)
        elif (device := topics.device_of(topic, "devices")) is not None:
            status = decode_json(payload, DeviceStatus)
            snap.devices[device] = status
    except (ProtocolError, SignatureError) as e:
        snap.problems.append((topic, f"{e.reason}: {e}"))


def collect_status(settings: Settings, wait: float = DEFAULT_WAIT) -> Snapshot:
    """Read the task's retained state from the broker (see ``read_retained`` for when it stops)."""
    topics = Topics(settings.topic_prefix, settings.task)
    snap = Snapshot(settings.task, settings.broker.url, settings.topic_prefix)
    held = read_retained(
        settings.broker,
        [
            topics.model,
            topics.plan,
            topics.aggregator_status,
            topics.version_metrics_filter,
            topics.device_status_filter,
        ],
        wait=wait,
        required=[topics.model],
        name="status",
    )
    for topic, payload in held.items():
        _absorb(snap, topics, topic, payload)
    return snap


def render_status(snap: Snapshot, last: int) -> None:
    """Print the human-readable status of a task."""
    out = console()
    out.print(Text.assemble(("task ", "bold"), (snap.task, "bold cyan"), f" on {snap.broker}"))
    m = snap.model
    if m is None:
        raise NotReadyError("render_status needs a snapshot with a model")
    graph = "none" if set(m.graph_sha256) == {"0"} else sha_short(m.graph_sha256)
    parent = f" (parent v{m.parent})" if m.parent is not None else ""
    out.print(
        Text.assemble(
            ("model      ", "bold"),
            (f"v{m.version}", "bold green"),
            f"{parent} {human_bytes(snap.model_bytes)} sha {sha_short(snap.model_sha256)} "
            f"graph {graph} {flat_size(m.weights)} params in {len(m.weights)} tensors",
        )
    )
    out.print(
        f"           published {fmt_time(m.time)}, {m.updates} updates, {m.examples} examples"
    )
    if snap.plan is not None:
        out.print(Text.assemble(("plan       ", "bold"), describe_plan(snap.plan)[5:]))
    else:
        out.print(Text.assemble(("plan       ", "bold"), ("none retained", "yellow")))
    a = snap.aggregator
    if a is None:
        out.print(Text.assemble(("aggregator ", "bold"), ("no status retained", "yellow")))
    else:
        style = "green" if a.state == "online" else "red"
        # The secure round gets a line of its own below.
        plain = a.model_copy(update={"round_id": None, "round_stage": None, "checked_in": None})
        text = describe_aggregator(plain)[len("aggregator ") :]
        out.print(
            Text.assemble(
                ("aggregator ", "bold"),
                (a.state, style),
                text[len(a.state) :],
                f" (status {fmt_age(time.time() - a.time)} ago)" if a.time else "",
            )
        )
    if a is not None and a.round_stage is not None:
        out.print(Text.assemble(("round      ", "bold"), *_round_line(a)))
    online = snap.devices_online
    out.print(
        Text.assemble(
            ("devices    ", "bold"),
            (f"{online} online", "green" if online else "yellow"),
            f", {len(snap.devices) - online} offline",
        )
    )
    if snap.devices:
        table = Table(box=None, pad_edge=False, header_style="bold")
        cols = ("device", "state", "version", "lag", "examples", "outbox", "sent", "software",
                "seen")  # fmt: skip
        for col in cols:
            table.add_column(
                col, justify="right" if col in ("lag", "examples", "outbox", "sent") else "left"
            )
        staleness = snap.plan.max_staleness if snap.plan is not None else 0
        for name in sorted(snap.devices):
            d = snap.devices[name]
            table.add_row(
                name,
                Text(d.state, "green" if d.state in ONLINE_STATES else "red"),
                "-" if d.version is None else f"v{d.version}",
                _lag_cell(snap.lag(d), staleness),
                str(d.examples),
                str(d.outbox),
                str(d.updates_sent),
                d.software or "-",
                f"{fmt_age(time.time() - d.time)} ago" if d.time else "-",
            )
        out.print(table)
    if snap.metrics:
        shown = sorted(snap.metrics)[-last:]
        out.print(Text(f"versions (last {len(shown)} of {len(snap.metrics)} retained)", "bold"))
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in (
            "version",
            "updates",
            "examples",
            "train_loss",
            "eval_loss",
            "eval_acc",
            "norm",
            "seconds",
            "published",
        ):
            table.add_column(col, justify="left" if col in ("version", "published") else "right")
        for v in reversed(shown):
            vm = snap.metrics[v]
            table.add_row(
                f"v{v}",
                str(vm.updates),
                str(vm.examples),
                fmt_num(vm.train_loss),
                fmt_num(vm.eval_loss),
                fmt_num(vm.eval_accuracy),
                fmt_num(vm.mean_update_norm),
                f"{vm.seconds:.1f}",
                f"{fmt_age(time.time() - vm.time)} ago" if vm.time else "-",
            )
        out.print(table)
    else:
        out.print(Text.assemble(("versions   ", "bold"), "no version metrics retained"))
    for topic, reason in snap.problems:
        out.print(Text.assemble(("bad message ", "bold red"), f"{topic}: {reason}"))


def _round_line(a: AggregatorStatus) -> tuple[str | tuple[str, str], ...]:
    """The secure-aggregation round: its id and stage, or waiting for check-ins."""
    checked = f", {a.checked_in} checked in" if a.checked_in is not None else ""
    if a.round_id is None or a.round_stage == "checkin":
        return (("collecting check-ins", "cyan"), checked)
    return (f"{a.round_id} stage ", (a.round_stage or "?", "bold cyan"), checked)


def _lag_cell(lag: int | None, max_staleness: int) -> Text:
    """Versions behind: yellow once behind, red beyond the plan's staleness window (an update
    from that version would be rejected ``stale``)."""
    if lag is None:
        return Text("-")
    style = "green" if lag == 0 else "yellow" if lag <= max_staleness else "red"
    return Text(str(lag), style)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--wait",
    type=click.FloatRange(0.1, 600),
    default=DEFAULT_WAIT,
    show_default=True,
    help="Longest wait for the broker's retained messages, s.",
)
@click.option(
    "--last",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Versions shown in the table.",
)
@settings_options
def status(settings: Settings, as_json: bool, wait: float, last: int) -> int:
    """Show a task's version, plan, aggregator, devices and recent versions."""
    quiet_transport(settings)
    snap = collect_status(settings, wait)
    topics = Topics(settings.topic_prefix, settings.task)
    bad_model = [reason for topic, reason in snap.problems if topic == topics.model]
    if snap.model is None and bad_model:
        raise FededgeError(
            f"the retained model of task {settings.task!r} is invalid: {bad_model[0]}"
        )
    if snap.model is None:
        found = len(snap.devices) + len(snap.metrics) + (snap.plan is not None)
        raise FededgeError(
            f"task {settings.task!r} has no model on {settings.broker.url} (nothing retained on "
            f"{topics.model} within {wait:g} s"
            + (f"; {found} other retained messages exist" if found else "")
            + "): check --task/--prefix or run `fededge model init`"
        )
    if as_json:
        click.echo(json.dumps(snap.to_json(), sort_keys=True))
    else:
        render_status(snap, last)
    return 0


def _silence_stdout() -> None:
    # The reader went away (`fededge watch | head`): later writes, and Python's flush at exit,
    # would raise BrokenPipeError again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError):
        os.dup2(devnull, sys.stdout.fileno())


@click.command("watch")
@click.option("--raw", is_flag=True, help="Show topic, size and a preview instead of decoding.")
@click.option("--count", type=click.IntRange(1), help="Stop after this many messages.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="Stop after S seconds.")
@settings_options
def watch(settings: Settings, raw: bool, count: int | None, timeout: float | None) -> int:
    """Print every message under the prefix (or of --task), decoded, one line each.

    Updates are summarised (device, base version, examples, size), never their values.
    Ctrl-C stops it (exit code 0).
    """
    # --task narrows the stream; without it (even if a config names a task) every task shows.
    task_given = click.get_current_context().params.get("task") is not None
    topic_filter = (
        Topics(settings.topic_prefix, settings.task).all_filter
        if task_given
        else f"{settings.topic_prefix}/#"
    )
    quiet_transport(settings)
    out = console()
    client = MqttClient(
        settings.broker, f"fededge-watch-{uuid.uuid4().hex[:10]}", persistent=False, name="watch"
    )
    seen = 0
    try:
        with client:
            # QoS 0: an observer must never add in-flight pressure on the broker.
            client.subscribe(topic_filter, qos=0)
            deadline = None if timeout is None else time.monotonic() + timeout
            while count is None or seen < count:
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    break
                try:
                    msg = client.messages.get(timeout=left)
                except queue.Empty:
                    continue
                seen += 1
                stamp = time.strftime("%H:%M:%S", time.localtime())
                retained = " (retained)" if msg.retain else ""
                if raw:
                    body, style = raw_line(msg.payload), ""
                else:
                    line = describe(msg.topic, msg.payload, settings.topic_prefix)
                    body = line.text
                    style = "bold red" if line.bad else STYLES.get(line.kind, "")
                out.print(
                    Text.assemble(
                        (stamp, "dim"),
                        " ",
                        (msg.topic, "bold"),
                        " ",
                        (body, style),
                        (retained, "dim"),
                    )
                )
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch normally ends
    except BrokenPipeError:
        _silence_stdout()
    return 0
