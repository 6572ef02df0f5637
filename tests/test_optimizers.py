"""Server optimizers (plan ``server_optimizer``): Numba kernels fused with finalize, checked
bit for bit against numpy references, applied by the core, durable across a restart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_aggregator_core import Harness

from fededge.aggregator import kernels
from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import NewVersion
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.store import Store, task_root
from fededge.protocol import Plan, decode_json

OPTS = ["avgm", "adagrad", "adam", "yogi"]


def reference_step(
    base: np.ndarray, mean: np.ndarray, m: np.ndarray, v: np.ndarray, opt: str, lr: float,
    b1: float, b2: float, eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Reddi et al. 2021, Algorithm 2 (no bias correction), in numpy float64."""
    x = base.astype(np.float64)
    if opt == "avgm":
        m2 = b1 * m + mean
        return (x + lr * m2).astype(np.float32), m2, v.copy()
    m2 = b1 * m + (1.0 - b1) * mean
    d2 = mean * mean
    if opt == "adagrad":
        v2 = v + d2
    elif opt == "adam":
        v2 = b2 * v + (1.0 - b2) * d2
    else:
        v2 = v - (1.0 - b2) * d2 * np.sign(v - d2)
    return (x + lr * m2 / (np.sqrt(v2) + eps)).astype(np.float32), m2, v2


@pytest.mark.parametrize("opt", OPTS)
def test_kernel_matches_numpy_reference_bit_for_bit(opt: str) -> None:
    rng = np.random.default_rng(1)
    d = 10_001
    base = rng.normal(size=d).astype(np.float32)
    m = np.zeros(d)
    v = np.zeros(d)
    rm, rv, rbase = m.copy(), v.copy(), base.copy()
    for _ in range(4):
        acc = rng.normal(scale=0.01, size=d) * 7.0
        new, m, v = kernels.server_step(
            base, acc, 7.0, 0.3, opt, m, v, b1=0.9, b2=0.99, eps=1e-3
        )  # fmt: skip
        ref, rm, rv = reference_step(rbase, acc / 7.0, rm, rv, opt, 0.3, 0.9, 0.99, 1e-3)
        np.testing.assert_array_equal(new, ref)
        np.testing.assert_array_equal(m, rm)
        if opt != "avgm":
            np.testing.assert_array_equal(v, rv)
        base, rbase = new, ref


def test_kernel_leaves_its_inputs_and_rejects_bad_arguments() -> None:
    base = np.ones(5, np.float32)
    acc = np.ones(5)
    m, v = np.zeros(5), np.zeros(5)
    kernels.server_step(base, acc, 1.0, 1.0, "adam", m, v, b1=0.9, b2=0.99, eps=1e-3)
    assert not m.any() and not v.any()
    with pytest.raises(ValueError, match="optimizer"):
        kernels.server_step(base, acc, 1.0, 1.0, "lion", m, v, b1=0.9, b2=0.99, eps=1e-3)
    with pytest.raises(ValueError, match="b1"):
        kernels.server_step(base, acc, 1.0, 1.0, "adam", m, v, b1=1.0, b2=0.99, eps=1e-3)
    with pytest.raises(ValueError, match="m: length"):
        kernels.server_step(base, acc, 1.0, 1.0, "adam", m[:4], v, b1=0.9, b2=0.99, eps=1e-3)


def test_plan_fields_are_omitted_at_their_defaults() -> None:
    assert b"server_optimizer" not in Plan().to_bytes()
    raw = Plan(server_optimizer="yogi", server_epsilon=0.01).to_bytes()
    assert b'"server_optimizer":"yogi"' in raw and b'"server_epsilon":0.01' in raw
    assert b"server_momentum" not in raw
    assert decode_json(raw, Plan).server_optimizer == "yogi"


def _deltas(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    return {
        "b": rng.normal(scale=0.05, size=3).astype(np.float32),
        "w": rng.normal(scale=0.05, size=(2, 4)).astype(np.float32),
    }


def _run(h: Harness, first: int, last: int) -> list[dict[str, Any]]:
    """Versions from updates first..last-1, two per version (two devices); their weights."""
    out = []
    for i in range(first, last):
        effects = h.send(f"u{i}", device=f"dev{i % 2}", base=i // 2, delta=_deltas(i))
        out += [e.model.weights for e in effects if isinstance(e, NewVersion)]
    return out


def _restart(h: Harness, tmp_path: Any) -> None:
    h.store.close()
    h.store = Store(task_root(tmp_path, "t1"), fsync=False)
    h.core = AggregatorCore(h.settings, h.store, AggregatorMetrics())
    h.core.state.restore(h.now)


@pytest.mark.parametrize("opt", OPTS)
def test_core_applies_the_optimizer_and_a_restart_continues_bit_identically(
    tmp_path: Any, opt: str
) -> None:
    plan = Plan(
        min_updates_per_version=2, max_staleness=2, server_optimizer=opt, server_learning_rate=0.5
    )
    a = Harness(tmp_path / "a", plan)
    straight = _run(a, 0, 8)
    assert len(straight) == 4
    # The same stream with a restart (a new process on the same state) after version 2 and
    # one update into version 3 (it sits in the WAL).
    b = Harness(tmp_path / "b", plan)
    resumed = _run(b, 0, 5)
    _restart(b, tmp_path / "b")
    resumed += _run(b, 5, 8)
    assert len(resumed) == 4
    for x, y in zip(straight, resumed, strict=True):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    # And each version is the numpy reference applied to the weighted mean delta.
    m = np.zeros(11)
    v = np.zeros(11)
    base = np.zeros(11, np.float32)
    for k in range(4):
        mean = np.concatenate(
            [(_deltas(2 * k)[n].astype(np.float64).ravel() * 10
              + _deltas(2 * k + 1)[n].astype(np.float64).ravel() * 10) / 20 for n in ("b", "w")]
        )  # fmt: skip
        base, m, v = reference_step(base, mean, m, v, opt, 0.5, 0.9, 0.99, 1e-3)
        got = np.concatenate([straight[k][n].ravel() for n in ("b", "w")])
        np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-7)


def test_secure_round_results_get_the_optimizer(tmp_path: Any) -> None:
    plan = Plan(server_optimizer="adam", server_learning_rate=0.5)
    h = Harness(tmp_path, plan)
    base = h.mv0.weights
    mean = _deltas(0)
    sgd = {n: (base[n].astype(np.float64) + 0.5 * mean[n]).astype(np.float32) for n in base}
    model, _ = h.core.new_version(sgd, _metrics(), [], round_id="r1", now=h.now + 1)
    flat = np.concatenate([mean[n].astype(np.float64).ravel() for n in ("b", "w")])
    ref, _, _ = reference_step(np.zeros(11, np.float32), flat, np.zeros(11), np.zeros(11),
                               "adam", 0.5, 0.9, 0.99, 1e-3)  # fmt: skip
    got = np.concatenate([model.weights[n].ravel() for n in ("b", "w")])
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert h.core.state.opt_state is not None


def _metrics() -> dict[str, Any]:
    return {"updates": 3, "examples": 30, "train_loss": None, "eval_loss": None,
            "eval_accuracy": None, "mean_update_norm": None}  # fmt: skip


@pytest.mark.broker
def test_kill_9_of_the_aggregator_process_keeps_the_optimizer_state_bit_identical(
    broker: Any, tmp_path: Any
) -> None:
    """A real aggregator process with adam, killed with SIGKILL between versions and with an
    update in its WAL: the version after the restart is bit for bit the uninterrupted one."""
    import signal
    import subprocess

    from aggtools import Sender, init_task, make_settings
    from test_aggregator_durability import _start, _wait_ready

    d = 50_000
    plan = Plan(min_updates_per_version=2, clip_norm=1e9, max_examples_weight=1000,
                server_optimizer="adam", server_learning_rate=0.1)  # fmt: skip
    s = make_settings(broker.url, tmp_path / "state", checkpoint_every=100)
    init_task(s, {"w": np.zeros(d, np.float32)}, plan)
    log = tmp_path / "aggregator.log"
    proc = _start(tmp_path, broker.url, s.task, log)
    _wait_ready(proc, log, 1)
    a, b = Sender(s, "deva"), Sender(s, "devb")
    # (sender, value, examples, base): constant vectors with integer sums, exact in float64.
    stream = [(a, 1, 1, 0), (b, 2, 2, 0), (a, 3, 3, 1), (b, 4, 1, 1), (a, 1, 2, 2), (b, 5, 1, 2)]
    try:
        for k, (dev, c, n, base) in enumerate(stream):
            if k == 5:  # version 2 out, update 5 acknowledged (in the WAL): kill -9
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = _start(tmp_path, broker.url, s.task, log)
            uid = dev.update({"w": np.full(d, float(c), np.float32)}, n=n, uid=f"u{k}", base=base)
            assert dev.receipt(uid, timeout=60).status == "accepted"
            if k % 2:
                a.model(base + 1, timeout=60)
        v3 = a.model(3, timeout=60)
    finally:
        a.close()
        b.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    x = np.zeros(d, np.float32)
    m, v = np.zeros(d), np.zeros(d)
    for k in range(0, 6, 2):
        (_, c0, n0, _), (_, c1, n1, _) = stream[k], stream[k + 1]
        acc = np.full(d, float(c0 * n0 + c1 * n1))
        x, m, v = kernels.server_step(x, acc, float(n0 + n1), 0.1, "adam", m, v,
                                      b1=0.9, b2=0.99, eps=1e-3)  # fmt: skip
    np.testing.assert_array_equal(v3.weights["w"], x)
    assert "replayed from the WAL" in log.read_text()
