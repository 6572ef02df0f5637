"""Train-step latency on the device: LiteRT (shipped bundles) vs the numpy reference MLP.

Run: ``python -m bench.bench_train`` (writes the "train" section of docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from bench._report import machine, median_time, write_section
from fededge.build.reference import mlp_forward, mlp_train_step
from fededge.device.bundle import load_bundle, shipped_bundle_path
from fededge.device.datasets import load_digits
from fededge.device.runtime import RUNTIME_NAME, ModelRuntime
from fededge.device.training import local_update

STEPS = 200
BATCH = 32


def _per_step(fn: object, steps: int = STEPS) -> float:
    """Median over repeats of the mean time of one call, in microseconds."""

    def loop() -> None:
        for _ in range(steps):
            fn()  # type: ignore[operator]

    return median_time(loop, repeats=7, warmup=1) / steps * 1e6


def main() -> None:
    """Measure and write the section."""
    x_all, y_all = load_digits()
    x, y = x_all[:BATCH], y_all[:BATCH]
    rows = []
    for name in ("digits_mlp", "digits_cnn"):
        b = load_bundle(shipped_bundle_path(name))
        rt = ModelRuntime.from_bundle(b)
        w = b.weights
        runner = rt._train.runners["train"]  # the bare signature call, without our checks
        raw = {"x": rt._x(x), "y": y, "lr": np.array(0.1, np.float32), **w}
        t_rt = _per_step(lambda rt=rt, w=w: rt.train_step(x, y, 0.1, w))
        t_raw = _per_step(lambda runner=runner, raw=raw: runner(**raw))
        t_inf = _per_step(lambda rt=rt, w=w: rt.infer(x[:1], w))

        # A partial batch resizes the interpreter (and back for the next epoch): time that.
        def alternate(rt: ModelRuntime = rt, w: dict[str, np.ndarray] = w) -> None:
            rt.train_step(x, y, 0.1, w)
            rt.train_step(x[:31], y[:31], 0.1, w)

        t_alt = _per_step(alternate)
        t_resize = t_alt / 2 - t_rt

        def epoch(rt: ModelRuntime = rt, w: dict[str, np.ndarray] = w) -> None:
            local_update(
                rt, w, x_all, y_all, epochs=1, batch_size=BATCH, learning_rate=0.1,
                clip_norm=1.0, noise_stddev=0.01, rng=np.random.default_rng(0),
            )  # fmt: skip

        t_epoch = median_time(epoch, repeats=5)
        t_np = None
        if name == "digits_mlp":
            t_np = _per_step(lambda w=w: mlp_train_step(x, y, 0.1, w))
            t_np_inf = _per_step(lambda w=w: mlp_forward(x[:1], w))
        rows.append((name, b.spec.num_parameters, t_rt, t_raw, t_np, t_inf, t_epoch, t_resize))
    lines = [
        f"Machine: {machine()}; runtime {RUNTIME_NAME}, one interpreter thread.",
        "",
        f"One SGD step on a batch of {BATCH} digits (median over 7 runs of the mean of {STEPS} "
        "steps), one single-example prediction, and a whole `local_update` epoch over the 1,797 "
        "digits (57 steps, with clipping and noise).",
        "",
        "| model | parameters | train step, ModelRuntime | bare signature call | numpy reference "
        "| LiteRT / numpy | predict 1 example | local_update epoch | extra per resize |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, params, t_rt, t_raw, t_np, t_inf, t_epoch, t_resize in rows:
        np_cell = f"{t_np:.1f} µs" if t_np else "—"
        ratio = f"{t_rt / t_np:.2f}x" if t_np else "—"
        lines.append(
            f"| {name} | {params:,} | {t_rt:.1f} µs | {t_raw:.1f} µs | {np_cell} | {ratio} "
            f"| {t_inf:.1f} µs | {t_epoch * 1e3:.1f} ms | {t_resize:.0f} µs |"
        )
    lines += [
        "",
        f"numpy reference MLP prediction of 1 example: {t_np_inf:.1f} µs. The CNN has no numpy "
        "reference (its graph is checked against TensorFlow's eager step in tests/test_build.py). "
        "'Extra per resize': added cost of a step whose batch size differs from the previous "
        "step's (alternating 32 and 31); a partial last batch pays it twice per epoch.",
    ]
    write_section("train", "\n".join(lines))


if __name__ == "__main__":
    main()
