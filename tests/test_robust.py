"""Robust aggregation (plan ``robust``): kernels against numpy, the core's versions, the plan."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from test_aggregator_core import Harness
from test_optimizers import _restart, reference_step

from fededge.aggregator import robust
from fededge.aggregator.effects import NewVersion
from fededge.errors import ProtocolError
from fededge.protocol import Plan, decode_json
from fededge.protocol.encoding import decode_delta, encode_delta
from fededge.protocol.messages import SecureAggregation


# -- kernels ----------------------------------------------------------------------------------
def _ref_trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    k = x.shape[0]
    t = int(np.floor(beta * k))
    out: np.ndarray = np.sort(x.astype(np.float64), axis=0)[t : k - t].mean(axis=0)
    return out


def _blocks() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = []
    for k in (1, 2, 3, 4, 5, 10, 17, 24, 25, 31):  # insertion sort up to 24, then np.sort
        for b in (1, 7, 64):
            out.append((f"normal-{k}x{b}", rng.normal(size=(k, b)).astype(np.float32)))
            # ties: few distinct values, so sorted columns hold runs of equal values
            out.append((f"ties-{k}x{b}", rng.integers(-2, 3, size=(k, b)).astype(np.float32)))
    out.append(("constant", np.full((6, 5), 3.5, np.float32)))
    out.append(("huge", np.array([[3e38, -3e38], [3e38, -3e38], [1, 2]], np.float32)))
    return out


@pytest.mark.parametrize(("name", "x"), _blocks(), ids=[n for n, _ in _blocks()])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.34, 0.49])
def test_trimmed_mean_matches_numpy(name: str, x: np.ndarray, beta: float) -> None:
    out = np.empty(x.shape[1])
    trim = robust.trimmed_mean(x, beta, out)
    assert trim == int(np.floor(beta * x.shape[0]))  # k=1, or k small for beta: no trimming
    np.testing.assert_allclose(out, _ref_trimmed(x, beta), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("name", "x"), _blocks(), ids=[n for n, _ in _blocks()])
def test_median_matches_numpy_bit_for_bit(name: str, x: np.ndarray) -> None:
    out = np.empty(x.shape[1])
    robust.median(x, out)
    np.testing.assert_array_equal(out, np.median(x.astype(np.float64), axis=0))


@pytest.mark.parametrize(("k", "b"), [(1, 1), (5, 3), (10, 200), (31, 130)])
def test_parallel_kernels_equal_the_serial_ones_bit_for_bit(k: int, b: int) -> None:
    x = np.random.default_rng(k * b).normal(size=(k, b)).astype(np.float32)
    serial, par = np.empty(b), np.empty(b)
    robust.trimmed_mean(x, 0.2, serial)
    robust.trimmed_mean(x, 0.2, par, parallel=True)
    np.testing.assert_array_equal(serial, par)
    robust.median(x, serial)
    robust.median(x, par, parallel=True)
    np.testing.assert_array_equal(serial, par)


def test_weighted_mean_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 33)).astype(np.float32)
    w = rng.random(9) * 5
    out = np.empty(33)
    robust.weighted_mean(x, w, out)
    np.testing.assert_allclose(out, w @ x.astype(np.float64) / w.sum(), rtol=1e-12)


def test_kernels_refuse_bad_arguments_with_the_argument_named() -> None:
    x = np.ones((3, 4), np.float32)
    out = np.empty(4)
    with pytest.raises(ValueError, match="beta"):
        robust.trimmed_mean(x, 0.5, out)
    with pytest.raises(ValueError, match="x: expected a float32"):
        robust.median(x.astype(np.float64), out)
    with pytest.raises(ValueError, match="x: not C-contiguous"):
        robust.median(np.ones((4, 3), np.float32).T, out)
    with pytest.raises(ValueError, match="out: expected float64 of shape"):
        robust.median(x, np.empty(5))
    with pytest.raises(ValueError, match="at least one row"):
        robust.median(np.ones((0, 4), np.float32), out)
    with pytest.raises(ValueError, match="w: weights"):
        robust.weighted_mean(x, np.zeros(3), out)


# -- the plan ---------------------------------------------------------------------------------
def test_plan_fields_are_omitted_at_their_defaults_and_refused_with_secure_aggregation() -> None:
    assert b"robust" not in Plan().to_bytes()
    raw = Plan(robust="trimmed_mean", robust_beta=0.2, robust_zeroing=3.0).to_bytes()
    assert b'"robust":"trimmed_mean","robust_beta":0.2,"robust_zeroing":3.0' in raw
    assert decode_json(raw, Plan).robust_beta == 0.2
    sa = SecureAggregation()
    for fields in ({"robust": "median"}, {"robust_zeroing": 2.0}):
        with pytest.raises(ValueError, match="a secure round reveals only the sum"):
            Plan(secure_aggregation=sa, **fields)
    bad = Plan(robust="median").model_dump() | {"secure_aggregation": sa.model_dump()}
    import json

    with pytest.raises(ProtocolError, match="cannot be combined with secure_aggregation"):
        decode_json(json.dumps(bad).encode(), Plan)
    with pytest.raises(ValueError, match="robust_beta"):
        Plan(robust="trimmed_mean", robust_beta=0.5)
    for fields in ({"robust": "median"}, {"robust_zeroing": 2.0}):
        with pytest.raises(ValueError, match="a rotation mixes them"):
            Plan(update_rotation="hadamard", **fields)


def test_plan_vector_in_the_docs() -> None:
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    blocks = dict(re.findall(r"```vector (\S+)\n(.*?)```", doc, re.S))
    plan = Plan(robust="trimmed_mean", robust_beta=0.2, robust_zeroing=3.0)
    assert plan.to_bytes() == blocks["plan-robust"].strip().encode()


# -- the core ---------------------------------------------------------------------------------
NAMES = ("b", "w")


def _delta(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(200 + i)
    return {
        "b": rng.normal(scale=0.05, size=3).astype(np.float32),
        "w": rng.normal(scale=0.05, size=(2, 4)).astype(np.float32),
    }


def _flat(d: dict[str, Any]) -> np.ndarray:
    return np.concatenate([np.asarray(d[n], dtype=np.float64).ravel() for n in NAMES])


def _send_all(
    h: Harness, deltas: list[dict[str, np.ndarray]], first: int = 0, **kw: Any
) -> list[Any]:
    out = []
    for i, d in enumerate(deltas[first:], start=first):
        effects = h.send(f"u{i}", device=f"dev{i}", delta=d, **kw)
        out += [e.model for e in effects if isinstance(e, NewVersion)]
    return out


def _stat(x: np.ndarray, plan: Plan) -> np.ndarray:
    if plan.robust == "median":
        med: np.ndarray = np.median(x, axis=0)
        return med
    return _ref_trimmed(x.astype(np.float32), plan.robust_beta)


@pytest.mark.parametrize("stat", ["trimmed_mean", "median"])
@pytest.mark.parametrize(("enc", "block"), [("f32", 0), ("f16", 0), ("int8", 0), ("int8", 3)])
def test_core_version_is_the_statistic_of_the_decoded_updates(
    tmp_path: Any, stat: str, enc: str, block: int
) -> None:
    k = 7
    plan = Plan(min_updates_per_version=k, robust=stat, robust_beta=0.3, server_learning_rate=0.5,
                update_encoding=enc, update_block=block, clip_norm=10)  # fmt: skip
    # checkpoint_every=2: the log rolls to a new segment every 2 updates, never checkpoints.
    h = Harness(tmp_path, plan, checkpoint_every=2, checkpoint_min_bytes=0)
    rng = np.random.default_rng(5)
    sent = [encode_delta(_delta(i), enc, block, rng) for i in range(k)]
    (model,) = _send_all(h, sent, encoding=enc, block=block)
    x = np.stack([_flat(decode_delta(s, enc, block)).astype(np.float32) for s in sent])
    want = (0.5 * _stat(x, plan)).astype(np.float32)  # base is 0
    np.testing.assert_array_equal(_flat(model.weights).astype(np.float32), want)
    assert len(h.store.segments(0)) == 0  # the next version's log starts empty


def test_zeroing_drops_updates_far_above_the_median_norm(tmp_path: Any) -> None:
    plan = Plan(min_updates_per_version=5, robust_zeroing=3.0, clip_norm=100)
    h = Harness(tmp_path, plan)
    deltas = [_delta(i) for i in range(5)]
    deltas[2] = {n: v * 50 for n, v in deltas[2].items()}  # 50x the norm: zeroed
    (model,) = _send_all(h, deltas)
    kept = [_flat(d).astype(np.float32).astype(np.float64) for j, d in enumerate(deltas) if j != 2]
    np.testing.assert_allclose(_flat(model.weights), np.mean(kept, axis=0), rtol=1e-6)
    assert h.metric("fededge_updates_zeroed_total") == 1
    assert model.updates == 5  # accepted and counted; only left out of the aggregate


def test_robust_aggregate_feeds_the_server_optimizer(tmp_path: Any) -> None:
    plan = Plan(min_updates_per_version=4, robust="median", server_optimizer="adam",
                server_learning_rate=0.1)  # fmt: skip
    h = Harness(tmp_path, plan)
    deltas = [_delta(i) for i in range(4)]
    (model,) = _send_all(h, deltas)
    med = np.median(np.stack([_flat(d).astype(np.float32) for d in deltas]), axis=0)
    z = np.zeros(11)
    ref, _, _ = reference_step(np.zeros(11, np.float32), med, z, z, "adam", 0.1, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(_flat(model.weights), ref, rtol=1e-5)
    assert h.core.state.opt_state is not None


def test_a_restart_mid_version_gives_the_same_version_bit_for_bit(tmp_path: Any) -> None:
    plan = Plan(min_updates_per_version=6, robust="trimmed_mean", robust_beta=0.2)
    deltas = [_delta(i) for i in range(6)]
    a = Harness(tmp_path / "a", plan, checkpoint_every=2, checkpoint_min_bytes=0)
    (straight,) = _send_all(a, deltas)
    b = Harness(tmp_path / "b", plan, checkpoint_every=2, checkpoint_min_bytes=0)
    assert _send_all(b, deltas[:5]) == []
    _restart(b, tmp_path / "b")  # a new process on the same state: the WAL is replayed
    (resumed,) = _send_all(b, deltas, first=5)
    for n in NAMES:
        np.testing.assert_array_equal(straight.weights[n], resumed.weights[n])


def test_a_plan_turned_robust_mid_version_falls_back_to_the_mean_for_that_version(
    tmp_path: Any, caplog: Any
) -> None:
    plan = Plan(min_updates_per_version=4)
    h = Harness(tmp_path, plan, checkpoint_every=1, checkpoint_min_bytes=0)  # log deleted
    deltas = [_delta(i) for i in range(8)]
    assert _send_all(h, deltas[:2]) == []
    h.control(h.topics.plan, Plan(min_updates_per_version=4, robust="median").to_bytes())
    (v1,) = _send_all(h, deltas[:4], first=2)
    mean = np.mean([_flat(d).astype(np.float32).astype(np.float64) for d in deltas[:4]], axis=0)
    np.testing.assert_allclose(_flat(v1.weights), mean, rtol=1e-6)
    # The background checkpoints of the first two are waited for: their log is gone.
    assert "the log holds 2 of its 4 updates" in caplog.text, caplog.text
    # The next version is logged from its start: the median.
    (v2,) = _send_all(h, deltas, first=4, base=1)
    med = np.median(np.stack([_flat(d).astype(np.float32) for d in deltas[4:]]), axis=0)
    np.testing.assert_allclose(_flat(v2.weights) - _flat(v1.weights), med, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("enc", "block"), [("f32", 0), ("f16", 0), ("int8", 0), ("int8", 3)])
def test_blocks_smaller_than_a_tensor_give_the_same_aggregate(
    tmp_path: Any, enc: str, block: int
) -> None:
    plan = Plan(min_updates_per_version=5, robust="trimmed_mean", robust_beta=0.2,
                update_encoding=enc, update_block=block)  # fmt: skip
    h = Harness(tmp_path, plan)
    rng = np.random.default_rng(9)
    sent = [encode_delta(_delta(i), enc, block, rng) for i in range(4)]
    _send_all(h, sent, encoding=enc, block=block)
    _, pending = h.core.state.ready()  # 4 of 5 updates in: aggregate the pending version
    whole = robust.aggregate(pending, plan)
    assert whole is not None
    x = np.stack([_flat(decode_delta(s, enc, block)).astype(np.float32) for s in sent])
    np.testing.assert_allclose(whole.delta, _ref_trimmed(x, 0.2), rtol=1e-12)
    for width in (1, 2, 3, 5):  # coordinates per block: int8 scale blocks straddle them
        calls: list[None] = []
        tiny = robust.aggregate(
            pending, plan, block_bytes=4 * 4 * width, progress=functools.partial(calls.append, None)
        )
        assert tiny is not None
        np.testing.assert_array_equal(whole.delta, tiny.delta)
        # The driver's watchdog is pinged after every block (tensors of 3 and 8 values).
        assert len(calls) == -(-3 // width) + -(-8 // width)


# -- the demo's byzantine devices ---------------------------------------------------------------
def test_sign_flip_is_the_opposite_direction_at_the_bound() -> None:
    from fededge.demo_attack import sign_flip
    from fededge.device.training import global_norm

    d = _delta(1)
    flipped = sign_flip(d, 5.0)
    assert 4.99 < global_norm(flipped) <= 5.0
    cos = float(_flat(flipped) @ _flat(d)) / (np.linalg.norm(_flat(d)) * global_norm(flipped))
    assert cos == pytest.approx(-1.0, abs=1e-6)
    assert global_norm(sign_flip({"w": np.zeros(3, np.float32)}, 5.0)) == 0.0


def test_demo_refuses_robust_with_secure_aggregation_and_an_all_byzantine_fleet() -> None:
    from fededge.demo import DemoConfig, byzantine_count, demo_plan
    from fededge.errors import ConfigError

    assert byzantine_count(DemoConfig(devices=10, byzantine_fraction=0.2)) == 2
    assert demo_plan(DemoConfig(robust="median")).robust == "median"
    with pytest.raises(ConfigError, match="cannot be combined with secure_aggregation"):
        demo_plan(DemoConfig(robust="trimmed_mean", secure_aggregation=True))
    with pytest.raises(ConfigError, match="no honest device"):
        byzantine_count(DemoConfig(devices=2, byzantine_fraction=0.9))
    with pytest.raises(ConfigError, match="not with secure aggregation"):
        byzantine_count(DemoConfig(byzantine_fraction=0.2, secure_aggregation=True))


def test_a_damaged_logged_record_is_a_storage_error_naming_the_segment(tmp_path: Any) -> None:
    from fededge.errors import StorageError

    plan = Plan(min_updates_per_version=3, robust="median")
    h = Harness(tmp_path, plan)
    _send_all(h, [_delta(i) for i in range(2)])
    _, pending = h.core.state.ready()
    (_, path), *_ = h.store.segments(0)
    path.write_bytes(path.read_bytes().replace(b'"dtype":"F32"', b'"dtype":"X32"', 1))
    with pytest.raises(StorageError, match=r"WAL .*\.wal: record at \d+ is unreadable"):
        robust.aggregate(pending, plan)


def test_model_init_refuses_a_robust_secure_plan_before_connecting(
    tmp_path: Any, capsys: Any
) -> None:
    from fededge.cli import main
    from fededge.protocol.tensors import encode_tensors

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(encode_tensors({"w": np.zeros(3, np.float32)}, {}))
    plan = tmp_path / "plan.json"
    plan.write_text('{"v":1,"kind":"plan","robust":"trimmed_mean","secure_aggregation":{}}')
    rc = main(["model", "init", "--weights", str(weights), "--plan", str(plan),
               "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path)])  # fmt: skip
    assert rc == 2
    assert "cannot be combined with secure_aggregation" in capsys.readouterr().err
