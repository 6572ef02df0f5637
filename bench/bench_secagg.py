"""SecAgg+ round costs, fededge against Flower's SecAgg+ primitives (n=100, d=100k, 10% dropout).

Run with a venv that has flwr (the project's does): ``.venv/bin/python bench/bench_secagg.py``.
Writes the ``secagg`` section of docs/benchmarks.md (``--no-write``: prints it).

fededge: a whole in-memory round (fededge.testing.secagg, every message through its wire
encoding), timing the device's encode + masking and the server's unmasking inside it, and each
device's whole CPU time in the round (thread CPU time inside every DeviceRound entry point:
construction, start, set_input, handle - key generation, signatures and their checks, shares,
quantisation and masks; in this one-process simulation the modular adds run the Numba kernels
that ``warmup()`` loads for the aggregator, where a device without Numba uses numpy's).
``--baseline REV`` also measures the device side of another revision in the same run (round
protocol v1 is ``4ccfc27^``): ``git archive REV`` goes to a temporary directory and this script
runs in subprocesses against either tree (``FEDEDGE_BENCH_TREE``), alternating the two (ABBA)
for ``--pairs`` pairs so both see the same load; it reports the medians and the median of the
per-pair ratios of device CPU per round, per stage too, and the bytes and unmasking time.
Flower: the same steps rebuilt from flwr's own functions, in the order its ``secaggplus_mod``
(masked-input stage) and ``SecAggPlusWorkflow.unmask_stage`` call them: ``quantize``,
``factor_combine``, ``pseudo_rand_gen``, ``generate_shared_key``, ``parameters_*``,
``create_shares``/``combine_shares``, ``dequantize``. Flower's ``num_shares`` counts the node
itself, so it is our neighbour count + 1.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# FEDEDGE_BENCH_TREE: measure the code of another checkout (set by --baseline for its runs).
sys.path.insert(0, os.environ.get("FEDEDGE_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

from bench._report import machine, median_time, write_section
from fededge.secagg import crypto
from fededge.secagg.device import DeviceRound
from fededge.secagg.graph import Stage
from fededge.secagg.messages import TO_SERVER, Message, encode
from fededge.secagg.quantize import FixedPoint, add_mod, warmup
from fededge.secagg.server import ServerRound
from fededge.testing.secagg import Simulation, make_config

REPO = Path(__file__).resolve().parent.parent


class Timer:
    """Collects durations of wrapped methods."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def wrap(self, owner: Any, name: str, key: str, only_if: Callable[[Any], bool] = bool) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = original(*args, **kwargs)
            if only_if(result):
                self.times.setdefault(key, []).append(time.perf_counter() - t0)
            return result

        setattr(owner, name, timed)


def run_fededge(n: int, d: int, k: int, t: int, dropout: float, repeats: int) -> dict[str, Any]:
    devices = [f"dev{i:03d}" for i in range(n)]
    rng = np.random.default_rng(0)
    inputs = {x: (rng.standard_normal(d).astype(np.float32) * 0.01, 50.0) for x in devices}
    dropped = devices[: int(n * dropout)]
    timer = Timer()
    timer.wrap(FixedPoint, "encode", "encode", only_if=lambda r: True)
    timer.wrap(DeviceRound, "_maybe_send_masked", "mask")  # only calls that produced a message
    timer.wrap(ServerRound, "_close_unmask", "unmask")
    timer.wrap(ServerRound, "_on_masked", "fold", only_if=lambda r: True)
    removed: list[tuple[int, float]] = []  # (masks, seconds) per apply_masks call, if any
    try:
        from fededge.secagg import unmask
    except ImportError:  # a --baseline tree from before the fused removal
        pass
    else:
        apply_masks = unmask.apply_masks

        def counted(acc: Any, terms: Any, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            apply_masks(acc, terms, *args, **kwargs)
            removed.append((len(terms), time.perf_counter() - t0))

        unmask.apply_masks = counted
    cpu: dict[str, float] = {}
    stage_cpu: dict[tuple[str, str], float] = {}  # (device, entry point or message type)

    def per_device(name: str) -> None:
        original = getattr(DeviceRound, name)

        @functools.wraps(original)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent = time.thread_time() - t0
                who = getattr(self, "device_id", None) or (args[0] if args else "?")
                cpu[who] = cpu.get(who, 0.0) + spent
                what = f"handle {args[0].TYPE}" if name == "handle" else name
                stage_cpu[who, what] = stage_cpu.get((who, what), 0.0) + spent

        setattr(DeviceRound, name, timed)

    for name in ("__init__", "start", "set_input", "handle"):
        per_device(name)
    sent: dict[str, int] = {}
    received: dict[str, int] = {}

    def count(to: str, msg: Message) -> list[Message]:
        size = len(encode(msg))
        sender = getattr(msg, "device", None)
        if to == TO_SERVER and sender is not None:
            sent[sender] = sent.get(sender, 0) + size
        else:
            for x in devices if to.startswith("@") else [to]:
                received[x] = received.get(x, 0) + size
        return [msg]

    wall = []
    for r in range(repeats):
        cfg = make_config(
            f"bench-{r}", devices, d, threshold=t, neighbours=k, clip=1.0, max_weight=100.0
        )
        sim = Simulation(
            cfg, inputs, {Stage.MASKED: dropped}, seed=f"bench{r}".encode(), tamper=count
        )
        t0 = time.perf_counter()
        server = sim.run()
        wall.append(time.perf_counter() - t0)
        assert server.stage == Stage.DONE, server.abort_reason
    prg = crypto.MaskPRG(d + 1)
    seed = bytes(range(32))
    # The device's masking step split in two: k key agreements, then k + 1 expand-and-add.
    rand = crypto.deterministic_random(b"bench")
    mine, peers = (
        crypto.generate_keypair(rand),
        [crypto.generate_keypair(rand).public for _ in range(k)],
    )
    y = np.zeros(d + 1, dtype=np.uint32)

    def agreements() -> None:
        agreement = crypto.KeyAgreement(mine.private)
        for i, peer in enumerate(peers):
            crypto.pair_seed(agreement.with_peer(peer), "r", "a", f"b{i}")

    def expand_add() -> None:
        for _ in range(k + 1):
            add_mod(y, prg.expand(seed), 32)

    def expand_only() -> None:
        for _ in range(k + 1):
            prg.expand(seed)

    # Alternate the two so that both see the same (shared, noisy) host.
    pairs = [(median_time(expand_only, 5, 1), median_time(expand_add, 5, 1)) for _ in range(5)]
    prg_s = statistics.median(p[0] for p in pairs) / (k + 1)
    expand_add_s = statistics.median(p[1] for p in pairs)
    agree_s = median_time(agreements, repeats=21, warmup=2)
    survivors = [x for x in devices if x not in dropped]
    device_cpu_s = statistics.median(cpu[x] / repeats for x in survivors)
    stages = sorted({what for _, what in stage_cpu})
    stage_s = {
        w: statistics.median(stage_cpu.get((x, w), 0.0) / repeats for x in survivors)
        for w in stages
    }
    masks_per_device = 1 + k  # self mask + one per neighbour (fewer if a neighbour dropped early)
    med = {key: statistics.median(v) for key, v in timer.times.items()}
    calls = len(removed) // repeats  # apply_masks calls per round
    per_round = [removed[i : i + calls] for i in range(0, len(removed), calls)] if calls else []
    return {
        "encode_s": med["encode"],
        "mask_s": med["mask"],
        "device_s": med["encode"] + med["mask"],
        "device_cpu_s": device_cpu_s,
        "stage_s": stage_s,
        "fold_s": med["fold"],
        "unmask_s": med["unmask"],
        "remove_s": statistics.median(sum(t for _, t in r) for r in per_round) if removed else None,
        "masks_removed": statistics.median(sum(m for m, _ in r) for r in per_round)
        if removed
        else None,
        "round_wall_s": statistics.median(wall),
        "prg_gbs": 4 * (d + 1) / prg_s / 1e9,
        "mask_gbs": masks_per_device * 4 * (d + 1) / med["mask"] / 1e9,
        "agree_s": agree_s,
        "expand_add_gbs": (k + 1) * 4 * (d + 1) / expand_add_s / 1e9,
        "sent_bytes": statistics.median(sent[x] / repeats for x in survivors),
        "received_bytes": statistics.median(received[x] / repeats for x in survivors),
    }


def run_removal(d: int, masks: int, repeats: int) -> dict[str, float]:
    """Removing ``masks`` masks of d + 1 words from a sum, measured apart and alternated so
    all variants see the same load: the plain path (expand each mask, then add it), the fused
    path on 1 thread and on the default threads, and the AES-CTR keystream alone (the floor:
    the same bytes of keystream into a cache-resident buffer, nothing added)."""
    from fededge.secagg import unmask

    rng = np.random.default_rng(1)
    terms = [(rng.bytes(32), 1 if i % 2 else -1) for i in range(masks)]
    acc = rng.integers(0, 1 << 32, d + 1, dtype=np.uint32)
    chunk = unmask.DEFAULT_CHUNK_WORDS
    buffer = bytearray(4 * chunk + 16)
    zeros = bytes(4 * chunk)

    def keystream_only() -> None:
        for seed, _ in terms:
            enc = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()
            for start in range(0, d + 1, chunk):
                enc.update_into(zeros[: 4 * min(chunk, d + 1 - start)], buffer)

    variants: dict[str, Callable[[], None]] = {
        "plain_1": lambda: unmask.apply_masks_reference(acc, terms, 32),
        "fused_1": lambda: unmask.apply_masks(acc, terms, 32, threads=1),
        "fused_n": lambda: unmask.apply_masks(acc, terms, 32),
        "aes_1": keystream_only,
    }
    times: dict[str, list[float]] = {key: [] for key in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    out = {key: statistics.median(v) for key, v in times.items()}
    out["threads"] = unmask.default_threads()
    return out


def run_flower(n: int, d: int, k: int, t: int, dropout: float, repeats: int) -> dict[str, float]:
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    clipping_range, target_range, mod_range, max_weight = 8.0, 1 << 22, 1 << 32, 1000.0
    nids = list(range(1, n + 1))
    # Flower's SecAgg+ graph: each node with num_shares - 1 = k others (a ring, like ours).
    neighbours = {
        i: {nids[(p + s) % n] for s in range(-k // 2, k // 2 + 1)} for p, i in enumerate(nids)
    }
    keys = {i: generate_key_pairs() for i in nids}  # (sk1, pk1) masking keys
    pk = {i: bytes_to_public_key(public_key_to_bytes(keys[i][1])) for i in nids}
    seeds = {i: bytes(np.random.default_rng(i).integers(0, 256, 32, dtype=np.uint8)) for i in nids}
    dead = set(nids[: int(n * dropout)])
    active = set(nids) - dead
    update = [np.random.default_rng(0).standard_normal(d).astype(np.float32) * 0.01]

    def device_round(nid: int) -> list[np.ndarray]:
        ratio = 50.0 / max_weight
        q_ratio = round(ratio * target_range)
        params = parameters_multiply(update, q_ratio / target_range)
        quantized = factor_combine(q_ratio, quantize(params, clipping_range, target_range))
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(seeds[nid], mod_range, dims))
        for other in sorted(neighbours[nid] - {nid}):
            shared = generate_shared_key(keys[nid][0], pk[other])
            mask = pseudo_rand_gen(shared, mod_range, dims)
            op = parameters_addition if nid > other else parameters_subtraction
            quantized = op(quantized, mask)
        result: list[np.ndarray] = parameters_mod(quantized, mod_range)
        return result

    def quantize_only() -> None:
        params = parameters_multiply(update, round(50.0 / max_weight * target_range) / target_range)
        quantize(params, clipping_range, target_range)

    device_s = median_time(lambda: device_round(1), repeats=repeats, warmup=1)
    quantize_s = median_time(quantize_only, repeats=repeats, warmup=1)
    masked = [device_round(i) for i in sorted(active)]
    agg = masked[0]
    for m in masked[1:]:
        agg = parameters_addition(agg, m)
    agg = parameters_mod(agg, mod_range)
    # Shares as collected in unmask_stage: from each node's surviving neighbours (and itself).
    share_num = k + 1
    b_shares = {i: create_shares(seeds[i], t, share_num) for i in nids}
    sk_shares = {i: create_shares(private_key_to_bytes(keys[i][0]), t, share_num) for i in nids}
    collected = {}
    for i in nids:
        order = sorted(neighbours[i])
        src = b_shares[i] if i in active else sk_shares[i]
        collected[i] = [src[j] for j, nb in enumerate(order) if nb in active]

    def unmask(shares_per_secret: int | None) -> None:
        vec = [a.copy() for a in agg]
        for nid, share_list in collected.items():
            secret = combine_shares(share_list[:shares_per_secret])
            if nid in active:
                vec = parameters_subtraction(
                    vec, pseudo_rand_gen(secret, mod_range, get_parameters_shape(vec))
                )
            else:
                for other in sorted(neighbours[nid] - {nid}):
                    shared = generate_shared_key(bytes_to_private_key(secret), pk[other])
                    mask = pseudo_rand_gen(shared, mod_range, get_parameters_shape(vec))
                    vec = (parameters_addition if nid > other else parameters_subtraction)(
                        vec, mask
                    )
        recon = parameters_mod(vec, mod_range)
        _, recon = factor_extract(recon)
        dequantize(recon, clipping_range, target_range)

    # As the workflow does: every collected share goes into combine_shares (tens of seconds,
    # so timed once); and a kinder variant that passes exactly threshold shares.
    unmask_s = median_time(lambda: unmask(None), repeats=1, warmup=0)
    unmask_t_s = median_time(lambda: unmask(t), repeats=3, warmup=0)
    prg_s = median_time(
        lambda: pseudo_rand_gen(seeds[1], mod_range, [(d + 1,)]), repeats=21, warmup=2
    )
    ct = encrypt(
        generate_shared_key(keys[1][0], pk[2]),
        share_keys_plaintext_concat(1, 2, b_shares[1][0], sk_shares[1][0]),
    )
    sent = (
        2 * len(public_key_to_bytes(keys[1][1]))
        + k * len(ct)
        + sum(len(ndarray_to_bytes(a)) for a in masked[0])
        + k * len(b_shares[1][0])
    )
    return {
        "device_s": device_s,
        "quantize_s": quantize_s,
        "unmask_s": unmask_s,
        "unmask_t_s": unmask_t_s,
        "prg_gbs": 8 * (d + 1) / prg_s / 1e9,  # int64 words, as Flower generates them
        "sent_bytes": sent,
    }


def _tree_run(tree: Path, argv: list[str]) -> dict[str, Any]:
    """One ``--device-json`` run of this script against the code in ``tree``."""
    env = {**os.environ, "FEDEDGE_BENCH_TREE": str(tree), "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--device-json", *argv],
        env=env, cwd=tree, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_ab(baseline: str, pairs: int, argv: list[str]) -> dict[str, Any]:
    """Device CPU (and bytes, unmasking) of ``baseline`` (a git revision) and of this tree,
    alternated ABBA in subprocesses; medians and the median of the per-pair ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        base = Path(tmp)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", baseline],
                                 capture_output=True, check=True).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(base, filter="data")
        _tree_run(base, [*argv, "--repeats", "1"])  # Numba cache of the fresh tree, imports
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": []}
        for i in range(pairs):
            order = [("base", base), ("this", REPO)]
            for name, tree in order if i % 2 == 0 else order[::-1]:
                runs[name].append(_tree_run(tree, argv))
                print(f"pair {i + 1}/{pairs} {name}: device CPU "
                      f"{runs[name][-1]['device_cpu_s'] * 1e3:.2f} ms", file=sys.stderr)  # fmt: skip
    ratios = [
        b["device_cpu_s"] / a["device_cpu_s"]
        for a, b in zip(runs["base"], runs["this"], strict=True)
    ]

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    stages = sorted({w for r in runs["base"] + runs["this"] for w in r["stage_s"]})
    return {
        "pairs": pairs,
        "base_cpu_s": [r["device_cpu_s"] for r in runs["base"]],
        "this_cpu_s": [r["device_cpu_s"] for r in runs["this"]],
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "stage_s": {
            w: (
                statistics.median(r["stage_s"].get(w, 0.0) for r in runs["base"]),
                statistics.median(r["stage_s"].get(w, 0.0) for r in runs["this"]),
            )
            for w in stages
        },
        **{f"{n}_{k}": med(n, k) for n in runs for k in ("sent_bytes", "received_bytes",
                                                         "unmask_s", "device_cpu_s")},
    }  # fmt: skip


def ab_markdown(ab: dict[str, Any], baseline: str, d: int) -> list[str]:
    ms = 1e3
    per_pair = ", ".join(f"{a * ms:.1f} → {b * ms:.1f}" for a, b in
                         zip(ab["base_cpu_s"], ab["this_cpu_s"], strict=True))  # fmt: skip
    rows = [
        f"Device CPU per round, `{baseline}` (A) against this tree (B), d = {d:,}, {ab['pairs']}"
        f" A/B pairs in subprocesses (ABBA order); per pair (median device of each run):"
        f" {per_pair} ms.",
        "",
        "| | A | B | B / A |",
        "| --- | ---: | ---: | ---: |",
        f"| device CPU per round (median of pairs; ratio = median of per-pair ratios) |"
        f" {ab['base_device_cpu_s'] * ms:.2f} ms | {ab['this_device_cpu_s'] * ms:.2f} ms |"
        f" {ab['ratio']:.2f}x |",
    ]
    for what, (a, b) in ab["stage_s"].items():
        ratio = f"{b / a:.2f}x" if a > 0 else "new"
        rows.append(f"| &nbsp; `{what}` | {a * ms:.2f} ms | {b * ms:.2f} ms | {ratio} |")
    for key, label, scale, unit in (
        ("sent_bytes", "bytes sent per device", 1 / 1024, "KiB"),
        ("received_bytes", "bytes received per device", 1 / 1024, "KiB"),
        ("unmask_s", "aggregator unmasking", ms, "ms"),
    ):
        a, b = ab[f"base_{key}"], ab[f"this_{key}"]
        rows.append(f"| {label} | {a * scale:.1f} {unit} | {b * scale:.1f} {unit} | {b / a:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=100_000)
    parser.add_argument("--neighbours", type=int, default=20)
    parser.add_argument("--threshold", type=int, default=11)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-flower", action="store_true", help="measure fededge only")
    parser.add_argument("--baseline", metavar="REV", help="also measure REV's device side (A/B)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs with --baseline")
    parser.add_argument("--device-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, d, k, t = args.n, args.d, args.neighbours, args.threshold
    load_before = os.getloadavg()
    warmup()  # as a service does at start: no kernel compile/cache load inside a round
    if args.device_json:  # one tree's side of --baseline
        print(json.dumps(run_fededge(n, d, k, t, args.dropout, args.repeats)))
        return
    ab = None
    if args.baseline:
        argv = [f"--{a}={getattr(args, a)}" for a in ("n", "d", "neighbours", "threshold",
                                                      "dropout", "repeats")]  # fmt: skip
        ab = run_ab(args.baseline, args.pairs, argv)
    ours = run_fededge(n, d, k, t, args.dropout, max(3, args.repeats // 2))
    removal = run_removal(d, int(ours["masks_removed"]), args.repeats)
    try:
        flwr = None if args.no_flower else run_flower(n, d, k, t, args.dropout, args.repeats)
    except ImportError:
        flwr = None
    ms = 1e3
    rows = [
        "| | fededge | Flower SecAgg+ | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]

    def row(name: str, ours_v: float, flwr_v: float | None, unit: str, scale: float = 1.0) -> None:
        f = f"{flwr_v * scale:.1f} {unit}" if flwr_v is not None else "n/a"
        ratio = f"{flwr_v / ours_v:.1f}x" if flwr_v is not None else ""
        rows.append(f"| {name} | {ours_v * scale:.1f} {unit} | {f} | {ratio} |")

    g = (lambda key: flwr[key]) if flwr else (lambda key: None)
    row("device: quantise", ours["encode_s"], g("quantize_s"), "ms", ms)
    row("device: quantise + mask expansion", ours["device_s"], g("device_s"), "ms", ms)
    rows.append(
        f"| device: CPU per round, all stages (numpy path) | {ours['device_cpu_s'] * ms:.1f} ms"
        " | | |"
    )
    row(
        "aggregator: unmasking (rebuild + regenerate + remove + decode)",
        ours["unmask_s"],
        g("unmask_s"),
        "ms",
        ms,
    )
    row(
        "aggregator: unmasking, Flower given exactly t shares per secret",
        ours["unmask_s"],
        g("unmask_t_s"),
        "ms",
        ms,
    )
    row("bytes sent per device", ours["sent_bytes"], g("sent_bytes"), "KiB", 1 / 1024)
    rows.append(f"| bytes received per device | {ours['received_bytes'] / 1024:.1f} KiB | | |")
    rows.append(
        f"| mask PRG keystream | {ours['prg_gbs']:.2f} GB/s (AES-128-CTR) | "
        f"{g('prg_gbs') or 0:.2f} GB/s (MT19937, 32-bit seed) | |"
    )
    r = removal
    removal_md = (
        f"Mask removal alone ({int(ours['masks_removed'])} masks of {d + 1:,} words, as in"
        f" the round; medians of {args.repeats}, variants alternated): plain path (expand each"
        f" mask, then add it) {r['plain_1'] * ms:.1f} ms; fused, 1 thread"
        f" {r['fused_1'] * ms:.1f} ms; fused, {int(r['threads'])} threads (default)"
        f" {r['fused_n'] * ms:.1f} ms; AES-CTR keystream alone, 1 thread (the floor)"
        f" {r['aes_1'] * ms:.1f} ms. Inside the rounds, the removal calls took"
        f" {ours['remove_s'] * ms:.1f} ms of the {ours['unmask_s'] * ms:.1f} ms unmasking."
    )
    md = "\n".join(
        [
            "## Secure aggregation (SecAgg+)",
            "",
            f"`bench/bench_secagg.py`: n = {n} devices, d = {d:,} parameters,"
            f" {args.dropout:.0%} of devices drop after sharing keys (before masked input),"
            f" {k} neighbours, threshold {t};"
            " medians; devices on one thread, the aggregator's mask removal on one thread per"
            " CPU. Ours: AES-128-CTR masks, X25519, uint32 words mod 2^32; Flower 1.x: MT19937"
            " masks from a 32-bit seed, ECDH P-384, int64 vectors.",
            "",
            *rows,
            "",
            f"Our device masks at {ours['mask_gbs']:.2f} GB/s of mask words ({1 + k} masks of"
            f" {4 * (d + 1) / 1e6:.1f} MB; key agreement and the modular adds included), against a"
            f" keystream of {ours['prg_gbs']:.2f} GB/s. Measured apart: the {k} key agreements"
            f" (X25519 + HKDF) take {ours['agree_s'] * ms:.1f} ms and expanding and adding the"
            f" {1 + k} masks runs at {ours['expand_add_gbs']:.2f} GB/s."
            f" The aggregator folds one masked input in"
            f" {ours['fold_s'] * ms:.2f} ms; a whole simulated round (all {n} devices and the"
            f" server, in one process, every message encoded) takes {ours['round_wall_s']:.1f} s."
            f" Each device also receives {ours['received_bytes'] / 1024:.1f} KiB.",
            "",
            removal_md,
            "",
            *(["", *ab_markdown(ab, args.baseline, d)] if ab else []),
            "",
            f"Machine: {machine()}; load average (1 min) {load_before[0]:.1f} at the start,"
            f" {os.getloadavg()[0]:.1f} at the end (2 cores, shared).",
        ]
    )
    if args.no_write:
        print(md)
    else:
        write_section("secagg", md)


if __name__ == "__main__":
    main()
