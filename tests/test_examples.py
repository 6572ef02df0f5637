"""The example store: validation, fresh examples, retention, concurrency and restarts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fededge.device.examples import ExampleStore, StateDb, validate_examples, validate_inputs
from fededge.errors import InputError

SHAPE = (4,)


def _store(tmp_path, **kw) -> ExampleStore:
    kw.setdefault("max_examples", 1000)
    kw.setdefault("max_age", 3600.0)
    return ExampleStore(StateDb(tmp_path / "state.sqlite"), **kw)


def _xy(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(start * 4, (start + n) * 4, dtype=np.float32).reshape(n, 4)
    return x, (np.arange(start, start + n) % 3).astype(np.int32)


@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        ([[1, 2, 3]], [0], "bad_shape"),
        ([[1, 2, 3, 4]], [0, 1], "bad_shape"),
        ([[1, 2, 3, 4], [1, 2]], [0, 1], "bad_shape"),  # ragged
        ([], [], "bad_shape"),
        ([[1, 2, 3, float("nan")]], [0], "non_finite"),
        ([[1, 2, 3, 1e39]], [0], "non_finite"),  # overflows float32
        ([[1, 2, 3, 10**400]], [0], "bad_type"),
        ([["a", 2, 3, 4]], [0], "bad_type"),
        ([[True, False, True, True]], [0], "bad_type"),
        ([[1, 2, 3, 4]], [3], "bad_label"),
        ([[1, 2, 3, 4]], [-1], "bad_label"),
        ([[1, 2, 3, 4]], [1.0], "bad_label"),
        ([[1, 2, 3, 4]], [True], "bad_label"),
        ([[1, 2, 3, 4]], "0", "bad_label"),
        ({"a": 1}, [0], "bad_type"),
    ],
)
def test_validation_names_the_problem(x, y, reason) -> None:
    with pytest.raises(InputError) as e:
        validate_examples(x, y, SHAPE, 3)
    assert e.value.reason == reason


def test_validation_accepts_flat_rows_for_images() -> None:
    x = validate_inputs(np.zeros((2, 64)), (8, 8, 1))
    assert x.shape == (2, 8, 8, 1) and x.dtype == np.float32
    xa, ya = validate_examples([[0.5] * 4], [2], SHAPE, 3)
    assert xa.dtype == np.float32 and ya.dtype == np.int32


def test_fresh_take_newest_and_mark_used(tmp_path) -> None:
    s = _store(tmp_path)
    s.add(*_xy(5))
    s.add(*_xy(3, start=5))
    assert s.fresh_count() == 8 and s.fresh_count(dim=4) == 8 and s.fresh_count(dim=5) == 0
    assert s.take(9, SHAPE) is None
    b = s.take(4, SHAPE)
    assert b is not None
    # The newest four, oldest first, exactly as stored.
    np.testing.assert_array_equal(b.x, _xy(4, start=4)[0])
    np.testing.assert_array_equal(b.y, _xy(4, start=4)[1])
    assert s.fresh_count() == 8  # take alone does not consume
    s.mark_used(b.ids)
    assert s.fresh_count() == 4 and s.count() == 8
    b2 = s.take(4, SHAPE)
    assert b2 is not None and set(b2.ids).isdisjoint(b.ids)


def test_retention_by_count_evicts_used_first_and_by_age(tmp_path) -> None:
    now = [1000.0]
    s = _store(tmp_path, max_examples=6, max_age=100.0, clock=lambda: now[0])
    s.add(*_xy(4))
    b = s.take(2, SHAPE)
    assert b is not None
    s.mark_used(b.ids)  # the two newest are used
    s.add(*_xy(4, start=4))  # 8 > 6: the 2 used ones go, all fresh stay
    assert s.count() == 6 and s.fresh_count() == 6
    s.add(*_xy(1, start=8))  # now the oldest fresh one goes
    remaining = s.take(6, SHAPE)
    assert remaining is not None and 0.0 not in remaining.x[:, 0]
    now[0] += 101
    s.add(*_xy(1, start=9))  # everything older than 100 s expires
    assert s.count() == 1


def test_concurrent_writers_and_restart(tmp_path) -> None:
    s = _store(tmp_path, max_examples=100_000)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(50):
                s.add(*_xy(3, start=k * 1000 + i * 3))
        except BaseException as e:
            errors.append(e)

    def trainer() -> None:
        try:
            for _ in range(100):
                if (b := s.take(5, SHAPE)) is not None:
                    s.mark_used(b.ids)
        except BaseException as e:
            errors.append(e)

    # A second connection to the same file, as another process would have.
    other = _store(tmp_path, max_examples=100_000)

    def other_process() -> None:
        try:
            for i in range(30):
                other.add(*_xy(2, start=9000 + 2 * i))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=trainer), threading.Thread(target=other_process)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.count() == 4 * 50 * 3 + 30 * 2
    fresh = s.fresh_count()
    s.db.close()
    other.db.close()
    again = _store(tmp_path, max_examples=100_000)
    assert again.count() == 660 and again.fresh_count() == fresh
