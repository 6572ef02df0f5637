"""Removing many masks from the aggregator's sum: the fused, chunked, multi-threaded path.

At unmasking the aggregator regenerates one mask per survivor (its self-mask) and one per
(dropped device, surviving partner) pair, ~270 masks of d + 1 words at n = 100, and adds or
subtracts each from the running sum. Expanding each mask in full and then folding it in moves
every mask and the whole accumulator through memory once per mask. Here the accumulator is
walked in cache-sized chunks instead: one AES-CTR stream per mask stays open (CTR continues
across ``update_into`` calls), each chunk of every mask's keystream is written into a small
buffer that stays in cache and folded into that chunk of the sum at once, so the accumulator
crosses memory once per call. ``update_into`` releases the GIL (pyca/cryptography detaches for
inputs of 2 KiB or more) and so do numpy's ufuncs, so threads working on disjoint ranges of the
accumulator run in parallel; a range starting at word ``w`` opens each stream at counter block
``initial + w / 4`` (mod 2^128, as AES-CTR increments the whole block).

The masks are those of docs/protocol.md (:class:`fededge.secagg.crypto.MaskPRG`);
:func:`apply_masks_reference` is the plain path, which the tests compare with this one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fededge.errors import SecAggError
from fededge.secagg import crypto
from fededge.secagg.quantize import add_mod, sub_mod

MaskTerm = tuple[bytes, int]
"""(32-byte mask seed, sign): +1 adds the seed's mask to the sum, -1 subtracts it."""

DEFAULT_CHUNK_WORDS = 1 << 15
"""Words per chunk (128 KiB): the chunk of the sum and the keystream buffer stay in L2."""

MIN_THREAD_WORDS = 1 << 15
"""Fewest words a thread gets (else fewer threads): below, starting one costs more than it saves."""

_WORDS_PER_BLOCK = 4  # a 16-byte AES block holds 4 uint32 words
_COUNTER_MOD = 1 << 128


def default_threads() -> int:
    """The CPUs this process may run on (the default number of unmasking threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _check(acc: npt.NDArray[np.uint32], terms: Sequence[MaskTerm], bits: int) -> None:
    if not isinstance(acc, np.ndarray) or acc.dtype != np.uint32 or acc.ndim != 1:
        raise ValueError("acc must be a 1-D uint32 numpy array")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError("acc must be contiguous and writeable")
    if not 8 <= bits <= 32:  # as fededge.secagg.quantize
        raise ValueError(f"bits must be in 8..32, got {bits}")
    for seed, sign in terms:
        if len(seed) != crypto.SEED_BYTES:
            raise SecAggError(f"seed must be {crypto.SEED_BYTES} bytes, got {len(seed)}")
        if sign not in (1, -1):
            raise ValueError(f"a mask's sign must be +1 or -1, got {sign}")


def apply_masks_reference(
    acc: npt.NDArray[np.uint32], terms: Sequence[MaskTerm], bits: int
) -> None:
    """acc += sign * PRG(seed) mod 2^bits for every term, one whole mask at a time."""
    _check(acc, terms, bits)
    if acc.shape[0] == 0:
        return
    prg = crypto.MaskPRG(acc.shape[0])
    for seed, sign in terms:
        (add_mod if sign > 0 else sub_mod)(acc, prg.expand(seed), bits)


def _encryptor(seed: bytes, first_word: int) -> object:
    counter = (int.from_bytes(seed[16:], "big") + first_word // _WORDS_PER_BLOCK) % _COUNTER_MOD
    return Cipher(algorithms.AES(seed[:16]), modes.CTR(counter.to_bytes(16, "big"))).encryptor()


def _apply_range(
    acc: npt.NDArray[np.uint32], first_word: int, terms: Sequence[MaskTerm], chunk_words: int
) -> None:
    """Fold every term's mask words ``first_word ..`` into ``acc`` (a view), modulo 2^32."""
    encryptors = [_encryptor(seed, first_word) for seed, _ in terms]
    ops = [np.add if sign > 0 else np.subtract for _, sign in terms]
    chunk_words = min(chunk_words, acc.shape[0])
    # update_into wants one spare block of room; the keystream is little-endian words.
    buffer = np.zeros(chunk_words + _WORDS_PER_BLOCK, dtype="<u4")
    out = buffer.data.cast("B")
    zeros = memoryview(bytes(4 * chunk_words))
    for start in range(0, acc.shape[0], chunk_words):
        part = acc[start : start + chunk_words]
        n = part.shape[0]
        keystream, plain = buffer[:n], zeros[: 4 * n]
        for encryptor, op in zip(encryptors, ops, strict=True):
            encryptor.update_into(plain, out)  # type: ignore[attr-defined]
            op(part, keystream, out=part)  # uint32 wraps: arithmetic modulo 2^32


def apply_masks(
    acc: npt.NDArray[np.uint32],
    terms: Sequence[MaskTerm],
    bits: int,
    *,
    chunk_words: int = DEFAULT_CHUNK_WORDS,
    threads: int | None = None,
) -> None:
    """acc += sign * PRG(seed) mod 2^bits for every term, fused and chunked; ``threads``
    (default: :func:`default_threads`) split the accumulator. Equal to
    :func:`apply_masks_reference` word for word; ``acc`` must hold values below 2^bits."""
    _check(acc, terms, bits)
    if chunk_words < _WORDS_PER_BLOCK or chunk_words % _WORDS_PER_BLOCK:
        raise ValueError(f"chunk_words must be a positive multiple of 4, got {chunk_words}")
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n_words = acc.shape[0]
    if n_words == 0 or not terms:
        return
    # Ranges start on block boundaries (so each stream opens at a whole counter block); a
    # thread gets at least MIN_THREAD_WORDS or it is not worth starting.
    blocks = -(-n_words // _WORDS_PER_BLOCK)
    threads = max(1, min(threads, n_words // MIN_THREAD_WORDS))
    bounds = [_WORDS_PER_BLOCK * (blocks * i // threads) for i in range(threads)] + [n_words]
    ranges = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if lo < hi]
    if len(ranges) == 1:
        _apply_range(acc, 0, terms, chunk_words)
    else:
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="unmask") as pool:
            futures = [
                pool.submit(_apply_range, acc[lo:hi], lo, terms, chunk_words) for lo, hi in ranges
            ]
            for future in futures:
                future.result()
    if bits < 32:
        np.bitwise_and(acc, np.uint32((1 << bits) - 1), out=acc)
