"""Rendering helpers of the fleet CLI: sizes, times, a console, one readable line per message.

Everything here is pure (bytes in, text out) except :func:`console`, so `fededge watch` and
`fededge status` share one description of every protocol message and tests need no broker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from fededge.errors import ProtocolError, SignatureError
from fededge.protocol import (
    AggregatorStatus,
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Update,
    VersionMetrics,
    decode_json,
    decode_tensors,
)
from fededge.protocol.messages import flat_size
from fededge.protocol.signing import SignedKind, is_signed, open_message

_SIGNED = {"model": SignedKind.MODEL, "plan": SignedKind.PLAN, "graph": SignedKind.GRAPH,
           "receipts": SignedKind.RECEIPT}  # fmt: skip

# The CLI reads whatever the broker delivered; the broker's own packet limit bounds it.
MAX_MESSAGE = 1 << 31
PREVIEW_BYTES = 48


def console() -> Console:
    """A console on the current stdout: colours only on a TTY, never wrapped when piped."""
    tty = sys.stdout.isatty()
    # Off a TTY rich assumes 80 columns and would squeeze tables and wrap lines; a log or a
    # pipe wants whole lines instead.
    width = None if tty else int(os.environ.get("COLUMNS", "0") or 0) or 200
    return Console(
        file=sys.stdout,
        soft_wrap=True,
        highlight=False,
        width=width,
        no_color=not tty,
    )


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def fmt_time(t: float | None) -> str:
    """A UTC wall-clock time with its age, or '-' when unknown (0)."""
    if not t:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    return f"{stamp}Z ({fmt_age(time.time() - t)} ago)"


def fmt_age(seconds: float) -> str:
    """A short duration: '12s', '3m', '5h', '2d'."""
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def fmt_num(x: float | None, digits: int = 4) -> str:
    """A float with a few significant digits, '-' for None."""
    return "-" if x is None else f"{x:.{digits}g}"


def sha_short(hexdigest: str) -> str:
    return hexdigest[:12]


def preview(payload: bytes) -> str:
    """The start of a payload: quoted text if it is printable UTF-8, else hex."""
    head = payload[:PREVIEW_BYTES]
    more = "..." if len(payload) > PREVIEW_BYTES else ""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    else:
        if text.isprintable():
            return json.dumps(text + more, ensure_ascii=False)
    return head.hex(" ") + (" ..." if more else "")


@dataclass(frozen=True)
class Line:
    """One decoded message: its kind (for colour), the text, and whether it was malformed."""

    kind: str
    text: str
    bad: bool = False


def _kv(**fields: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def describe_model(mv: ModelVersion, payload: bytes) -> str:
    parent = f" (parent v{mv.parent})" if mv.parent is not None else ""
    graph = "none" if set(mv.graph_sha256) == {"0"} else sha_short(mv.graph_sha256)
    return (
        f"model v{mv.version}{parent} {human_bytes(len(payload))} "
        f"sha {sha_short(hashlib.sha256(payload).hexdigest())} graph {graph} "
        f"{len(mv.weights)} tensors {flat_size(mv.weights)} params "
        f"updates={mv.updates} examples={mv.examples}"
        + (f" clip={fmt_num(mv.clip)}" if mv.clip is not None else "")
    )


def describe_update(u: Update, payload: bytes) -> str:
    # Never the values: an update is a device's private delta.
    extra = _kv(
        train_loss=fmt_num(u.train_loss) if u.train_loss is not None else None,
        eval_acc=fmt_num(u.eval_accuracy) if u.eval_accuracy is not None else None,
    )
    return (
        f"update {u.device} id={u.update_id} base=v{u.base_version} examples={u.num_examples} "
        f"{human_bytes(len(payload))} {len(u.delta)} tensors" + (f" {extra}" if extra else "")
    )


def describe_receipt(r: Receipt) -> str:
    text = f"receipt {r.device} id={r.update_id} {r.status} at v{r.version}"
    if r.pending is not None:
        text += f" -> v{r.pending}"
    if r.reason:
        text += f" reason={r.reason}"
    if r.detail:
        text += f" ({r.detail})"
    return text


def describe_device(d: DeviceStatus) -> str:
    v = f"v{d.version}" if d.version is not None else "no model"
    return (
        f"device {d.device} {d.state} {v} "
        + _kv(examples=d.examples, outbox=d.outbox, sent=d.updates_sent)
        + (f" software={d.software}" if d.software else "")
    )


def describe_aggregator(a: AggregatorStatus) -> str:
    v = f"v{a.version}" if a.version is not None else "no model"
    return (
        f"aggregator {a.state} {v} pending {a.pending_updates}/{a.min_updates_per_version} "
        f"updates ({a.pending_examples} examples) accepted={a.accepted_total} "
        f"rejected={a.rejected_total}"
        + (f" round {a.round_id} {a.round_stage}" if a.round_id and a.round_stage else "")
        + (f" checked_in={a.checked_in}" if a.checked_in is not None else "")
        + describe_privacy(a)
    )


def describe_privacy(a: AggregatorStatus) -> str:
    """`` epsilon=E/MAX left=L at delta=D`` and why versions stopped (empty without DP)."""
    if a.epsilon is None and a.max_epsilon is None and a.stopped is None:
        return ""
    spent = fmt_num(a.epsilon) if a.epsilon is not None else "0"
    text = f" epsilon={spent}"
    if a.max_epsilon is not None:
        left = a.max_epsilon - (a.epsilon or 0.0)
        text += f"/{fmt_num(a.max_epsilon)} left={fmt_num(max(0.0, left))}"
    if a.delta is not None:
        text += f" at delta={a.delta:g}"
    if a.stopped:
        text += f" STOPPED: {a.stopped}"
    return text


def describe_metrics(m: VersionMetrics) -> str:
    return f"metrics v{m.version} " + _kv(
        updates=m.updates,
        examples=m.examples,
        train_loss=fmt_num(m.train_loss) if m.train_loss is not None else None,
        eval_loss=fmt_num(m.eval_loss) if m.eval_loss is not None else None,
        eval_acc=fmt_num(m.eval_accuracy) if m.eval_accuracy is not None else None,
        norm=fmt_num(m.mean_update_norm) if m.mean_update_norm is not None else None,
        seconds=f"{m.seconds:.1f}",
        epsilon=fmt_num(m.epsilon) if m.epsilon is not None else None,
        delta=f"{m.delta:g}" if m.delta is not None else None,
        unclipped=fmt_num(m.unclipped) if m.unclipped is not None else None,
        clip=fmt_num(m.clip) if m.clip is not None else None,
    )


def describe_plan(p: Plan) -> str:
    return "plan " + _kv(
        epochs=p.epochs,
        batch=p.batch_size,
        lr=fmt_num(p.learning_rate),
        examples_per_update=p.examples_per_update,
        min_updates=p.min_updates_per_version,
        clip=fmt_num(p.clip_norm),
        noise=fmt_num(p.noise_stddev),
        z=fmt_num(p.noise_multiplier) if p.noise_multiplier else None,
        max_epsilon=fmt_num(p.max_epsilon) if p.max_epsilon is not None else None,
        clip_quantile=fmt_num(p.target_unclipped_quantile)
        if p.target_unclipped_quantile is not None
        else None,
        max_staleness=p.max_staleness,
        server_lr=fmt_num(p.server_learning_rate),
    )


def describe_graph(g: Graph, payload: bytes) -> str:
    model = g.spec.get("model")
    return (
        f"graph {human_bytes(len(g.tflite))} sha {sha_short(g.sha256)}"
        + (f" model={model}" if isinstance(model, str) else "")
        + f" (message {human_bytes(len(payload))})"
    )


def _json_summary(obj: object, limit: int = 160) -> str:
    if isinstance(obj, dict):
        parts = []
        for k, v in obj.items():
            if isinstance(v, str) and len(v) > 24:
                parts.append(f"{k}=<{len(v)} chars>")
            elif isinstance(v, list | dict):
                parts.append(f"{k}=<{len(v)} items>")
            else:
                parts.append(f"{k}={json.dumps(v)}")
        text = " ".join(parts)
    else:
        text = json.dumps(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_round(round_id: str, stage: str, payload: bytes) -> str:
    """A secure-aggregation round message: stage and size, its JSON fields or tensor header."""
    head = f"round {round_id} {stage or '-'} {human_bytes(len(payload))}"
    if payload[:1] == b"{":
        try:
            return f"{head} {_json_summary(json.loads(payload))}"
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return f"{head} (not JSON) {preview(payload)}"
    try:
        t = decode_tensors(payload, max_bytes=MAX_MESSAGE)
    except ProtocolError:
        return f"{head} {preview(payload)}"
    tensors = ", ".join(f"{k} {a.dtype}{list(a.shape)}" for k, a in t.tensors.items())
    meta = _json_summary(t.metadata, 100)
    return f"{head} tensors: {tensors}" + (f" meta: {meta}" if t.metadata else "")


def split_topic(topic: str, prefix: str) -> tuple[str, list[str]] | None:
    """``{prefix}/{task}/rest...`` -> (task, rest parts), or None for a foreign topic."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) < 2 or not parts[0]:
        return None
    return parts[0], parts[1:]


def describe(topic: str, payload: bytes, prefix: str) -> Line:
    """Decode one message by its topic into a line; malformed input becomes a 'bad' line."""
    where = split_topic(topic, prefix)
    if where is None:
        return Line("unknown", f"{human_bytes(len(payload))} {preview(payload)}")
    _task, rest = where
    kind = rest[0]
    if not payload and kind in ("model", "plan", "graph", "aggregator", "versions", "devices"):
        return Line("cleared", "(retained message cleared)")
    try:
        return _describe(kind, rest, payload)
    except ProtocolError as e:
        return Line(kind, f"[bad message] {e.reason}: {e}", bad=True)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        # A decoder should only raise ProtocolError; anything else is still a bad message here.
        return Line(kind, f"[bad message] {type(e).__name__}: {e}", bad=True)


def _describe(kind: str, rest: list[str], payload: bytes) -> Line:
    n = len(rest)
    if (signed_kind := _SIGNED.get(kind)) is not None and is_signed(payload):
        # Shown, not verified (a signed message is the v1 message behind a header).
        try:
            payload = open_message(payload, signed_kind, None).payload
        except SignatureError as e:
            return Line(kind, f"[bad message] {e.reason}: {e}", bad=True)
    if kind == "model" and n == 1:
        return Line(
            "model",
            describe_model(ModelVersion.from_bytes(payload, max_bytes=MAX_MESSAGE), payload),
        )
    if kind == "plan" and n == 1:
        return Line("plan", describe_plan(decode_json(payload, Plan)))
    if kind == "graph" and n == 1:
        return Line(
            "graph", describe_graph(Graph.from_bytes(payload, max_bytes=MAX_MESSAGE), payload)
        )
    if kind == "aggregator" and rest[1:] == ["status"]:
        return Line("status", describe_aggregator(decode_json(payload, AggregatorStatus)))
    if kind == "versions" and n == 3 and rest[2] == "metrics":
        return Line("metrics", describe_metrics(decode_json(payload, VersionMetrics)))
    if kind == "updates" and n == 2:
        u = Update.from_bytes(payload, max_bytes=MAX_MESSAGE)
        text = describe_update(u, payload)
        if u.device != rest[1]:
            text += f" [device differs from topic: {rest[1]}]"
        return Line("update", text)
    if kind == "receipts" and n == 2:
        return Line("receipt", describe_receipt(decode_json(payload, Receipt)))
    if kind == "devices" and n == 3 and rest[2] == "status":
        return Line("status", describe_device(decode_json(payload, DeviceStatus)))
    if kind == "rounds" and n >= 2:
        return Line("round", describe_round(rest[1], "/".join(rest[2:]), payload))
    return Line("unknown", f"{human_bytes(len(payload))} {preview(payload)}")


def raw_line(payload: bytes) -> str:
    """What `watch --raw` prints after the topic: size and a preview."""
    return f"{human_bytes(len(payload))} {preview(payload)}"


def finite(x: float) -> float | None:
    """A float for JSON output: None instead of NaN/Inf (JSON has neither)."""
    return x if math.isfinite(x) else None


STYLES = {
    "model": "bold green",
    "graph": "green",
    "plan": "cyan",
    "update": "yellow",
    "receipt": "magenta",
    "status": "blue",
    "metrics": "bold cyan",
    "round": "bright_magenta",
    "cleared": "dim",
    "unknown": "dim",
}
