"""Safetensors payloads: encode with the library, decode untrusted bytes strictly and zero-copy."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fededge.errors import ProtocolError
from fededge.protocol.vocab import RejectReason

MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
_DTYPES: dict[str, np.dtype[np.generic]] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "F16": np.dtype("<f2"),  # compressed updates (plan update_encoding f16)
    "I8": np.dtype("i1"),  # compressed updates (plan update_encoding int8)
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
}


@dataclass(frozen=True)
class TensorPayload:
    """A decoded safetensors payload: named read-only arrays plus string metadata."""

    tensors: dict[str, NDArray[np.generic]]
    metadata: dict[str, str]


def encode_tensors(
    tensors: Mapping[str, NDArray[np.generic]], metadata: Mapping[str, str]
) -> bytes:
    """Serialise named arrays and string metadata to safetensors bytes, deterministically.

    The safetensors library writes ``__metadata__`` in a per-process random (hash map) order,
    so equal messages would differ byte for byte; this writer fixes the order (metadata keys
    sorted, tensors by name) so payloads have stable hashes and test vectors. The output is
    plain safetensors: the tests check that the library reads it back.
    """
    arrays = [(name, np.ascontiguousarray(tensors[name])) for name in sorted(tensors)]
    head = encode_header([(n, a.dtype, a.shape) for n, a in arrays], metadata)
    return head + b"".join(a.tobytes() for _, a in arrays)


def encode_header(
    entries: Sequence[tuple[str, np.dtype[Any], tuple[int, ...]]],
    metadata: Mapping[str, str],
    *,
    start: int = 0,
    align: int = 8,
) -> bytes:
    """The length prefix and header of a safetensors file whose tensors follow in this order.

    Lets a writer stream a large array straight from its buffer after the header (the
    aggregator's checkpoints) instead of first copying it into one bytes object. The header
    is padded with spaces (as the format allows) so that the data starts at a multiple of
    ``align`` (a multiple of 8) when the file is written from offset ``start``: 8 by default,
    a page for a checkpoint written with direct I/O.
    """
    if align % 8:
        raise ValueError(f"align={align} is not a multiple of 8")
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata {k!r}: keys and values must be str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    pos = 0
    for name, dtype, shape in entries:
        code = next((c for c, dt in _DTYPES.items() if dt == dtype.newbyteorder("<")), None)
        if code is None or dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not allowed on the wire")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-(start + 8 + len(h)) % align)  # the data starts aligned (8 in the format)
    return struct.pack("<Q", len(h)) + h


def decode_tensors(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    max_header: int = MAX_HEADER_BYTES,
) -> TensorPayload:
    """Parse untrusted safetensors bytes; arrays are zero-copy read-only views of ``payload``.

    Every rule of the format is checked (header bound, JSON object, known dtypes, shapes
    matching byte lengths, offsets contiguous from 0 and covering the whole data section), so a
    hostile payload raises ProtocolError and never an IndexError or a huge allocation.
    """
    tensors, meta = decode_parts(payload, max_bytes=max_bytes, max_header=max_header)
    # A frozen dataclass's __init__ sets each field through object.__setattr__: filled at
    # once, the same object (this runs once per update the aggregator receives).
    out = _new(TensorPayload)
    out.__dict__.update(tensors=tensors, metadata=meta)
    return out


_new = object.__new__


def decode_parts(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    max_header: int = MAX_HEADER_BYTES,
) -> tuple[dict[str, NDArray[np.generic]], dict[str, str]]:
    """``decode_tensors`` as its two parts (tensors, metadata), without the TensorPayload."""
    buf = memoryview(payload).cast("B")
    size = len(buf)
    if size > max_bytes:
        raise ProtocolError(
            f"payload of {size} bytes exceeds the limit of {max_bytes}",
            reason=RejectReason.OVERSIZE,
        )
    if size < 8:
        raise ProtocolError(f"payload of {size} bytes is too short for safetensors")
    (hlen,) = _U64.unpack_from(buf, 0)
    if hlen > max_header or hlen > size - 8:
        raise ProtocolError(f"safetensors header length {hlen} is out of bounds")
    header = _scan_header(buf, hlen)
    if header is _NOT_SCANNED:  # json.loads: the same value, or the error to report
        try:
            header = json.loads(str(buf[8 : 8 + hlen], "utf-8"))
        except (ValueError, RecursionError) as e:  # also bad UTF-8 and >4300-digit integers
            raise ProtocolError(f"safetensors header is not valid JSON: {str(e)[:200]}") from None
    if type(header) is not dict:  # json.loads builds plain dicts, lists, str, int, float, bool
        raise ProtocolError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if type(meta) is not dict:
        raise ProtocolError("safetensors __metadata__ must map strings to strings")
    for v in meta.values():  # keys of a JSON object are always strings
        if type(v) is not str:
            raise ProtocolError("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise ProtocolError(f"{len(header)} tensors exceed the limit of {MAX_TENSORS}")
    data = buf[8 + hlen :]
    writable = not buf.readonly
    entries = [(_offsets(name, info), name, info) for name, info in header.items()]
    if len(entries) > 1:
        entries.sort(key=_first)
    tensors: dict[str, NDArray[np.generic]] = {}
    pos = 0
    ndata = len(data)
    for (start, end), name, info in entries:
        if start != pos:
            raise ProtocolError(f"tensor {name!r}: data offsets leave a gap or overlap")
        if end > ndata:
            raise ProtocolError(f"tensor {name!r}: data runs past the end of the payload")
        code = info.get("dtype")
        dtype = _DTYPES.get(code) if type(code) is str else _DTYPES.get(str(code))
        if dtype is None:
            raise ProtocolError(f"tensor {name!r}: dtype {info.get('dtype')!r} is not allowed")
        shape = info.get("shape")
        if type(shape) is not list or len(shape) > 8 or not _dims_ok(shape):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        count = math.prod(shape)  # Python ints: numpy's int64 product could wrap to 0
        if count * dtype.itemsize != end - start:
            raise ProtocolError(
                f"tensor {name!r}: shape {shape} of {info['dtype']} needs "
                f"{count * dtype.itemsize} bytes, offsets give {end - start}"
            )
        arr = np.frombuffer(data, dtype, count, start)  # positional: half the call's cost
        if len(shape) != 1:
            arr = arr.reshape(shape)
        if writable:  # a view of a read-only buffer (bytes) is read-only already
            arr.flags.writeable = False
        tensors[name] = arr
        pos = end
    if pos != ndata:
        raise ProtocolError(f"data section has {ndata - pos} trailing bytes not in any tensor")
    if len(tensors) > 1:
        tensors = dict(sorted(tensors.items()))
    return tensors, meta


_U64 = struct.Struct("<Q")
_NOT_SCANNED = object()
# The scanner json.loads itself uses (the default decoder's): called directly it skips the
# Python layers of json.loads (decode, raw_decode and two whitespace regexes).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.decoder.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _scan_header(buf: memoryview, hlen: int) -> Any:
    """The header as ``json.loads`` parses it, for the common header (a JSON value, then only
    the spaces that pad it); ``_NOT_SCANNED`` for anything else, which ``json.loads`` then
    parses or refuses with its own message."""
    try:
        text = str(buf[8 : 8 + hlen], "utf-8").rstrip(" ")
        value, end = _SCAN(text, 0)
    except Exception:  # StopIteration, ValueError, RecursionError: json.loads says what
        return _NOT_SCANNED
    return value if end == len(text) else _NOT_SCANNED


# The float32 tensor entries of a header exactly as ``encode_header`` writes them, for the fast
# path of ``Update.from_bytes`` (fededge/protocol/messages.py): a name of JSON string characters
# that need no escape (no quote, backslash or U+0000-U+001F: the JSON text is the name), up to 8
# dimensions below 10**12 (< 2**40, what _dims_ok allows), offsets as JSON integers. Whatever
# else a header holds (other dtypes or key orders, spaces, escapes) goes through decode_parts.
_JSON_CHARS = r'[^"\\\x00-\x1f]'
_DIM = r"(?:0|[1-9][0-9]{0,11})"
_OFFSET = r"(?:0|[1-9][0-9]{0,17})"
F32_ENTRIES = (
    rf'(?:,"{_JSON_CHARS}{{1,256}}":\{{"dtype":"F32","shape":\[(?:{_DIM}(?:,{_DIM}){{0,7}})?\],'
    rf'"data_offsets":\[{_OFFSET},{_OFFSET}\]\}})+'
)
_F32_ENTRY = re.compile(
    rf'"({_JSON_CHARS}{{1,256}})":\{{"dtype":"F32","shape":\[([0-9,]*)\],'
    rf'"data_offsets":\[([0-9]+),([0-9]+)\]\}}'
).findall
_F32 = _DTYPES["F32"]


def f32_tensors(
    payload: bytes | bytearray, data: int, entries: str
) -> dict[str, NDArray[np.generic]] | None:
    """The tensors ``decode_parts`` returns for a header whose tensor entries are
    ``entries`` (text matching ``F32_ENTRIES``, each entry after a comma), the data section
    starting at byte ``data`` of ``payload``; None if ``decode_parts`` would refuse them or
    order them otherwise (not sorted by name, not contiguous in that order, a name that is
    ``__metadata__``): then ``decode_parts`` decides."""
    tensors: dict[str, NDArray[np.generic]] = {}
    ndata = len(payload) - data
    pos, last = 0, ""
    writable = type(payload) is not bytes
    found = _F32_ENTRY(entries)
    if len(found) > MAX_TENSORS:
        return None
    for name, dims, first, end in found:
        start = int(first)
        # Names in increasing order: unique, and already the order decode_parts sorts into;
        # offsets contiguous from 0 in that order, which is then also the order of offsets.
        if name <= last or start != pos or name == "__metadata__":
            return None
        shape = None  # 1-D: the array as frombuffer makes it
        if dims and "," not in dims:
            count = int(dims)
        else:
            shape = [int(d) for d in dims.split(",")] if dims else []
            count = math.prod(shape)
        pos = int(end)
        if count * 4 != pos - start or pos > ndata:
            return None
        arr = np.frombuffer(payload, _F32, count, data + start)
        if shape is not None:
            arr = arr.reshape(shape)
        if writable:
            arr.flags.writeable = False
        tensors[name] = arr
        last = name
    return tensors if pos == ndata else None


def _first(entry: tuple[tuple[int, int], str, Any]) -> tuple[int, int]:
    return entry[0]


def _dims_ok(shape: list[Any]) -> bool:
    # type() is int: JSON gives int or bool, never another int subclass; bool is refused.
    for d in shape:  # noqa: SIM110 (a loop: all() over a generator costs a frame per call)
        if type(d) is not int or not 0 <= d < 1 << 40:
            return False
    return True


def _offsets(name: str, info: object) -> tuple[int, int]:
    if not name or len(name) > 256:  # keys of a JSON object are always strings
        raise ProtocolError(f"tensor name {name!r} is not a string of 1-256 characters")
    if type(info) is not dict:
        raise ProtocolError(f"tensor {name!r}: entry is not an object")
    offs = info.get("data_offsets")
    if (
        type(offs) is not list
        or len(offs) != 2
        or type(offs[0]) is not int
        or type(offs[1]) is not int
        or not 0 <= offs[0] <= offs[1]
    ):
        raise ProtocolError(f"tensor {name!r}: bad data_offsets {offs!r}")
    return offs[0], offs[1]
