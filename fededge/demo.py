"""`fededge demo`: the whole system on one machine — broker, aggregator, simulated devices.

The devices run the real device code (``Client``: LiteRT runtime, SQLite example store, on-disk
outbox, MQTT client) on non-IID Dirichlet partitions of scikit-learn's bundled digits; the
aggregator is the real service. Only the data feed and the held-out evaluation belong to the
demo harness: the aggregator never sees a label.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import queue
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fededge.errors import ConfigError, FededgeError, NotReadyError
from fededge.protocol import Graph, ModelVersion, Plan
from fededge.protocol.messages import SecureAggregation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What `fededge demo` runs; the defaults reach >= 0.90 held-out accuracy in about a minute."""

    devices: int = 10
    versions: int = 40
    model: str = "mlp"
    noise: float = 0.0
    clip: float = 5.0
    seed: int = 0
    alpha: float = 0.5
    broker: str | None = None
    mqtt_version: str | None = None
    # None: a task of its own for every run (see ``run_demo``).
    task: str | None = None
    state_dir: Path | None = None
    out_dir: Path = Path("demo-out")
    json_path: Path | None = None
    secure_aggregation: bool = False
    # Issue 13: the server optimizer and its learning rate, the update encoding.
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    update_encoding: str = "f32"
    update_block: int = 0
    examples_per_update: int = 32
    epochs: int = 5
    learning_rate: float = 0.1
    min_updates_per_version: int = 10
    timeout: float = 600.0
    # An example of examples/ (fededge.demo_examples) instead of the digits: its prebuilt bundle,
    # data, learning rate and batch size; the demo reports the task's metric.
    example: str | None = None
    # A privacy budget: the plan's noise multiplier is the smallest that keeps ``versions``
    # versions within it (docs/privacy.md); each version shows its epsilon.
    dp_epsilon: float | None = None
    # Adaptive clipping (docs/privacy.md): the clip starts at ``clip`` and moves toward this
    # quantile of the devices' update norms; each version shows the clip it publishes.
    target_unclipped_quantile: float | None = None


@dataclass
class VersionRow:
    """One line of the demo's progress and of its JSON summary."""

    version: int
    accuracy: float
    loss: float
    updates: int
    seconds: float
    # Every metric of the task (loss, its metrics, and extras such as the anomaly AUC).
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None  # spent by the versions so far (--dp-epsilon)
    clip: float | None = None  # published with the version (--target-unclipped-quantile)


@dataclass
class Summary:
    task: str
    broker: str
    devices: int
    secure_aggregation: bool
    final_accuracy: float
    versions: list[VersionRow] = field(default_factory=list)
    plot: str | None = None
    example: str | None = None
    metric: str = "accuracy"  # the task's primary metric
    final_metric: float = math.nan

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("plot")
        if self.example is None:  # the digits summary keeps its keys
            for k in ("example", "metric", "final_metric"):
                d.pop(k)
            for v in d["versions"]:
                v.pop("metrics")
        else:
            d.pop("final_accuracy")
            for v in d["versions"]:
                v.pop("accuracy")
        for v in d["versions"]:
            for k in ("epsilon", "clip"):
                if v[k] is None:
                    v.pop(k)
        return d


def demo_secure_aggregation(devices: int) -> SecureAggregation:
    """Rounds over the whole fleet: t = n/2 + 1, starting with 70% of the devices if need be."""
    if devices < 3:
        raise ConfigError(f"--secure-aggregation needs at least 3 devices, got {devices}")
    threshold = devices // 2 + 1
    return SecureAggregation(
        cohort_size=devices,
        min_cohort=max(threshold + 1, math.ceil(0.7 * devices)),
        threshold=threshold,
        stage_timeout=10.0,
        checkin_window=3.0,
        checkin_interval=1.0,
    )


def demo_plan(cfg: DemoConfig) -> Plan:
    sa = demo_secure_aggregation(cfg.devices) if cfg.secure_aggregation else None
    return Plan(
        epochs=cfg.epochs,
        batch_size=16,
        learning_rate=cfg.learning_rate,
        examples_per_update=cfg.examples_per_update,
        min_updates_per_version=min(cfg.min_updates_per_version, cfg.devices),
        clip_norm=cfg.clip,
        noise_stddev=cfg.noise,
        max_staleness=2,
        secure_aggregation=sa,
        server_optimizer=cfg.server_optimizer,
        server_learning_rate=cfg.server_lr,
        update_encoding=cfg.update_encoding,
        update_block=cfg.update_block,
        target_unclipped_quantile=cfg.target_unclipped_quantile,
        **_dp_fields(cfg),
    )


DP_DELTA = 1e-5


def _dp_fields(cfg: DemoConfig) -> dict[str, Any]:
    """noise_multiplier and max_epsilon for ``--dp-epsilon``: the smallest z (to 0.1 %) whose
    epsilon after ``cfg.versions`` versions is within the budget."""
    if cfg.dp_epsilon is None:
        return {}
    from fededge.aggregator.privacy import BIT_NOISE_SHARE, epsilon_of

    # With adaptive clipping a version is charged at z / sqrt(1.1) (the bit's share).
    f = math.sqrt(1 + BIT_NOISE_SHARE) if cfg.target_unclipped_quantile is not None else 1.0
    lo, hi = 0.05, 1000.0
    if epsilon_of(((hi / f, cfg.versions),), DP_DELTA) > cfg.dp_epsilon:
        raise ConfigError(
            f"--dp-epsilon {cfg.dp_epsilon:g} is too small for {cfg.versions} versions"
        )
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if epsilon_of(((mid / f, cfg.versions),), DP_DELTA) <= cfg.dp_epsilon:
            hi = mid
        else:
            lo = mid
    return {"noise_multiplier": hi, "max_epsilon": cfg.dp_epsilon, "delta": DP_DELTA}


def demo_epsilon(plan: Plan, version: int) -> float | None:
    """Epsilon after ``version`` DP versions, as the aggregator's accountant reports it."""
    if not plan.dp or version == 0:
        return None
    from fededge.aggregator.privacy import accounted_multiplier, epsilon_of

    return epsilon_of(((accounted_multiplier(plan), version),), plan.delta)


def run_task(cfg: DemoConfig) -> str:
    """The task a demo run uses: ``cfg.task``, or ``digits-demo-<6 hex digits>``, new each run.

    A run of its own task never meets a previous run's retained model, persistent sessions
    or queued messages on a shared broker, so every run starts at version 0.
    """
    what = (cfg.example or "digits").replace("_", "-")
    return cfg.task or f"{what}-demo-{secrets.token_hex(3)}"


def run_demo(cfg: DemoConfig, on_version: Callable[[VersionRow], None] = lambda r: None) -> Summary:
    """Run the demo to ``cfg.versions`` versions; return the per-version summary.

    On a broker of the user's (``cfg.broker``) the run clears what it leaves behind at the
    end: its task's retained messages and its clients' persistent sessions.
    """
    from fededge.device.bundle import load_bundle, shipped_bundle_path
    from fededge.device.datasets import dirichlet_partition, load_digits, train_test_split
    from fededge.device.runtime import ModelRuntime
    from fededge.embedded_broker import EmbeddedBroker

    demo_plan(cfg)  # a bad configuration fails before anything starts
    cfg = dataclasses.replace(cfg, task=run_task(cfg))
    extra: Callable[[Any, dict[str, np.ndarray]], dict[str, float]] = lambda rt, w: {}  # noqa: E731
    if cfg.example is not None:
        from fededge.demo_examples import extra_metrics, get_example

        ex = get_example(cfg.example)
        bundle = load_bundle(shipped_bundle_path(ex.name))
        data = ex.data(cfg.seed)
        xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
        groups = data.groups
        extra = functools.partial(extra_metrics, ex, data)
    else:
        name = {"mlp": "digits_mlp", "cnn": "digits_cnn"}[cfg.model]
        bundle = load_bundle(shipped_bundle_path(name))
        x, y = load_digits()
        rng = np.random.default_rng(cfg.seed)
        xtr, ytr, xte, yte = train_test_split(x, y, 0.2, rng)
        groups = ytr
    min_size = min(40, len(groups) // (2 * cfg.devices))  # diabetes has 354 training people
    parts_idx = dirichlet_partition(
        groups, cfg.devices, cfg.alpha, np.random.default_rng(cfg.seed + 1), min_size=min_size
    )
    parts = [(xtr[i], ytr[i]) for i in parts_idx]
    evaluator = _Evaluator(ModelRuntime.from_bundle(bundle), xte, yte, extra)

    embedded = None
    url = cfg.broker
    protocol = cfg.mqtt_version
    if url is None:
        embedded = EmbeddedBroker()
        embedded.start()
        url = embedded.url
        protocol = "3.1.1"  # all amqtt speaks
    tmp = None
    state_dir = cfg.state_dir
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fededge-demo-")
        state_dir = Path(tmp.name)
    try:
        return _run(
            cfg,
            url,
            protocol,
            state_dir,
            bundle,
            parts,
            xte,
            yte,
            evaluator,
            on_version,
            clear=embedded is None,
        )
    finally:
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()


def _settings(
    cfg: DemoConfig,
    url: str,
    protocol: str | None,
    state_dir: Path,
    client_id: str | None = None,
    **extra: Any,
) -> Any:
    from fededge.settings import load_settings

    broker = {"url": url, "protocol": protocol, "reconnect_max_delay": 2.0, "client_id": client_id}
    return load_settings(
        None,
        {
            "broker": broker,
            "task": cfg.task,
            "state_dir": state_dir,
            **extra,
        },
    )


def _enroll(settings: Any, owner: Any, clients: list[Any]) -> None:
    """Publish the owner-signed roster of the devices' identity keys (secure aggregation)."""
    from fededge.keys import public_text
    from fededge.mqtt import MqttClient
    from fededge.protocol import Topics
    from fededge.protocol.roster import Roster

    enrolled = {}
    for c in clients:
        identity = c.core.secagg.identity
        if identity is not None:
            enrolled[c.device_id] = public_text(identity.public_key())
    roster = Roster(settings.task, 1, enrolled).signed(owner)
    client = MqttClient(settings.broker, f"fededge-roster-{secrets.token_hex(5)}", persistent=False)
    with client:
        topic = Topics(settings.topic_prefix, settings.task).roster
        client.publish(topic, roster, retain=True, wait=True, timeout=30)


def _demo_keys(state_dir: Path, task: str) -> tuple[Any, dict[str, str], Path]:
    """The demo is its own model owner and aggregator operator: fresh keys for each run, and
    devices that trust only them (docs/security.md)."""
    from fededge.keys import generate, public_text

    keys = state_dir / "keys"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = generate(keys / f"{task}-owner.key", overwrite=True)
    agg_file = keys / f"{task}-aggregator.key"
    agg = generate(agg_file, overwrite=True)
    trust = {"owner_key": public_text(owner.public_key()),
             "aggregator_key": public_text(agg.public_key())}  # fmt: skip
    return owner, trust, agg_file


def _demo_privacy(plan: Plan) -> dict[str, Any]:
    """The demo devices' privacy floor: exactly the demo's own plan (a weaker one is refused)."""
    sa = plan.secure_aggregation
    return {
        "min_noise_multiplier": plan.effective_noise_multiplier,
        "max_clip_norm": plan.clip_norm,
        "require_secure_aggregation": sa is not None,
        "min_threshold": sa.threshold if sa is not None else 1,
        "min_cohort": sa.min_cohort if sa is not None else 1,
    }


def _run(
    cfg: DemoConfig,
    url: str,
    protocol: str | None,
    state_dir: Path,
    bundle: Any,
    parts: list[tuple[np.ndarray, np.ndarray]],
    xte: np.ndarray,
    yte: np.ndarray,
    evaluator: Any,
    on_version: Callable[[VersionRow], None],
    *,
    clear: bool,
) -> Summary:
    import threading

    from fededge.aggregator.service import Aggregator
    from fededge.device.client import Client
    from fededge.tasks import aggregator_client_id, clear_task, publish_initial

    if cfg.task is None:
        raise NotReadyError("_run needs the run's task (run_task)")
    plan = demo_plan(cfg)
    owner_key, trust, agg_key_file = _demo_keys(state_dir, cfg.task)
    agg_settings = _settings(
        cfg, url, protocol, state_dir, trust={"owner_key": trust["owner_key"]},
        aggregator={"metrics": False, "status_interval": 2.0, "signing_key": agg_key_file},
    )  # fmt: skip
    graph = Graph(task=cfg.task, tflite=bundle.graph, spec=bundle.spec.to_json())
    mv0 = ModelVersion(
        task=cfg.task,
        version=0,
        weights=dict(bundle.weights),
        graph_sha256=graph.sha256,
        time=time.time(),
    )
    publish_initial(agg_settings, graph, mv0, plan, force=True, sign_key=owner_key)
    client_ids = [aggregator_client_id(agg_settings)]
    agg = Aggregator(agg_settings)
    versions: queue.Queue[tuple[ModelVersion, float]] = queue.Queue()
    agg.on_new_version(lambda m, _old, _new: versions.put((m, time.monotonic())))
    agg.start(wait_for_model=30)
    stop = threading.Event()
    agg_thread = threading.Thread(
        target=agg.run, args=(stop.is_set,), name="aggregator", daemon=True
    )
    agg_thread.start()
    # Every version of this run is published after this instant: durations are never negative.
    t_start = time.monotonic()

    clients: list[Client] = []
    try:
        positions = [0] * cfg.devices

        def feed(i: int) -> None:
            # A device's local data stream: the next examples_per_update of its partition.
            n = plan.examples_per_update
            idx = (positions[i] + np.arange(n)) % len(parts[i][0])
            positions[i] += n
            clients[i].fit(parts[i][0][idx], parts[i][1][idx])

        for i in range(cfg.devices):
            client_id = f"fededge-{cfg.task}-dev-{i:02d}"
            client_ids.append(client_id)
            s = _settings(
                cfg,
                url,
                protocol,
                state_dir,
                client_id=client_id,
                device={"device_id": f"dev-{i:02d}", "metrics": False, "seed": cfg.seed * 1000 + i},
                trust=trust,
                privacy=_demo_privacy(plan),
            )
            c = Client(s)
            # New data arrives with each model version a device receives, so it trains on the
            # newest model it knows (the seed's rhythm: predict, collect, fit, repeat).
            c.on_new_version(functools.partial(_feed_on_version, feed, i))
            clients.append(c)
        if plan.secure_aggregation is not None:  # rounds need the devices enrolled in a roster
            _enroll(agg_settings, owner_key, clients)
        for c in clients:
            # retry: a connection lost while a device subscribes (seen on the embedded broker
            # under load) is retried in the background, as the daemon does, not fatal.
            c.start(retry=True)
        m0 = evaluator(mv0.weights)
        summary = Summary(
            task=cfg.task,
            broker=url,
            devices=cfg.devices,
            secure_aggregation=cfg.secure_aggregation,
            final_accuracy=m0.get("accuracy", math.nan),
            example=cfg.example,
            metric=evaluator.primary,
            final_metric=m0[evaluator.primary],
        )
        row0 = VersionRow(0, m0.get("accuracy", math.nan), m0["loss"], 0, 0.0, m0)
        summary.versions.append(row0)
        on_version(row0)
        last = t_start
        deadline = t_start + cfg.timeout
        while summary.versions[-1].version < cfg.versions:
            try:
                model, when = versions.get(timeout=10.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo timed out after {cfg.timeout:.0f} s") from None
                for i in range(cfg.devices):  # no version for a while: more data everywhere
                    feed(i)
                continue
            m = evaluator(model.weights)
            row = VersionRow(
                model.version, m.get("accuracy", math.nan), m["loss"], model.updates,
                when - last, m, demo_epsilon(plan, model.version), model.clip,
            )  # fmt: skip
            last = when
            summary.versions.append(row)
            summary.final_accuracy = m.get("accuracy", math.nan)
            summary.final_metric = m[evaluator.primary]
            on_version(row)
        return summary
    finally:
        stop.set()
        agg_thread.join(10)
        for c in clients:
            try:
                c.close(timeout=10)
            except Exception:
                log.exception("closing %s", c.device_id)
        agg.close()
        if clear:
            try:
                clear_task(agg_settings, client_ids)
            except FededgeError as e:
                log.warning("could not clear demo task %s from the broker: %s", cfg.task, e)


class _Evaluator:
    """Held-out metrics of a model version: the graph's ``eval`` plus the example's extras."""

    def __init__(
        self,
        runtime: Any,
        x: np.ndarray,
        y: np.ndarray,
        extra: Callable[[Any, dict[str, np.ndarray]], dict[str, float]],
    ) -> None:
        self.runtime, self.x, self.y, self.extra = runtime, x, y, extra
        self.primary = runtime.spec.task.primary_metric

    def __call__(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = self.runtime.metrics(self.x, self.y, weights)
        out.update(self.extra(self.runtime, weights))
        return out


def _feed_on_version(feed: Callable[[int], None], i: int, *_version: object) -> None:
    feed(i)


def write_outputs(summary: Summary, cfg: DemoConfig) -> Path:
    """Write the accuracy/loss plot (PNG) and, if asked, the JSON summary; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    vs = [r.version for r in summary.versions]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if summary.example is None:
        ax1.plot(vs, [r.accuracy for r in summary.versions], marker="o", ms=3)
        ax1.set(xlabel="model version", ylabel="held-out accuracy", ylim=(0, 1), title="Accuracy")
        ax1.axhline(0.9, color="grey", lw=0.8, ls="--")
    else:
        ax1.plot(vs, [r.metrics[summary.metric] for r in summary.versions], marker="o", ms=3)
        ax1.set(xlabel="model version", ylabel=f"held-out {summary.metric}", title=summary.metric)
    ax2.plot(vs, [r.loss for r in summary.versions], marker="o", ms=3, color="tab:orange")
    ax2.set(xlabel="model version", ylabel="held-out loss", title="Loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    sa = ", secure aggregation" if summary.secure_aggregation else ""
    what = summary.example or "digits"
    fig.suptitle(f"fededge demo: {summary.devices} devices, non-IID {what}{sa}")
    fig.tight_layout()
    png = cfg.out_dir / "accuracy.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    summary.plot = str(png)
    if cfg.json_path is not None:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return png
