"""Google's original BERT checkpoints (TensorFlow 1), read and written without TensorFlow or protobuf.

Google's releases (BERT-Base/Large, the small BERTs, multilingual, and domain BERTs such as BioBERT built on them)
are a folder of four files:

    bert_config.json                      the config: transformers' field names, without model_type
    vocab.txt                             the WordPiece vocabulary
    bert_model.ckpt.index                 which tensor is where: a LevelDB table (an "SSTable") of protobufs
    bert_model.ckpt.data-00000-of-00001   the tensors' raw little-endian bytes, one after another

The .index is TensorFlow's "tensor bundle" format. Its table maps each variable name to a BundleEntryProto (dtype,
shape, shard, offset, size, masked CRC-32C of the bytes); the empty key holds the BundleHeaderProto (number of
shards, endianness, version). The table is LevelDB's: data blocks of prefix-compressed keys with restart points,
each block followed by a compression byte and a masked CRC-32C, an index block pointing at the data blocks, and a
48-byte footer ending in a magic number. TensorFlow writes the blocks uncompressed (BundleWriter sets
kNoCompression: checked on files TensorFlow 2.20 wrote), so a snappy block is refused rather than decoded.

Variables are named as in Google's modeling.py: `bert/encoder/layer_3/attention/self/query/kernel`, kernels stored
[in, out] (torch's Linear is [out, in]: transposed both ways), LayerNorm `gamma`/`beta`. The heads of Google's
scripts map to bertkit's: pretraining `cls/predictions/...` and `cls/seq_relationship/...`, run_classifier.py's
`output_weights`/`output_bias` ([num_labels, H], already torch's orientation) to `classifier`, run_squad.py's
`cls/squad/...` to `qa_outputs`. Optimizer slots (`.../adam_m`, `.../adam_v`) and `global_step` are skipped.

`bertkit convert` is here too, with the writer of NVIDIA's recipe's layout (`save_nvidia`: a torch state dict under
its names; checkpoint.py reads it back).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bertkit.config import BertConfig, option, read_json
from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

GOOGLE_CONFIG_NAME = "bert_config.json"
CHECKPOINT_PREFIX = "bert_model.ckpt"
# The fields of Google's modeling.BertConfig (its from_dict sets any key, but these are the ones its code reads).
GOOGLE_FIELDS = ("attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size",
                 "initializer_range", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                 "num_hidden_layers", "type_vocab_size", "vocab_size")
EXPECTED = ("a TensorFlow checkpoint of Google's BERT (bert_model.ckpt.index and its .data file, as TensorFlow "
            "writes them)")


# ---------------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), which LevelDB blocks and tensor-bundle entries carry, "masked" as LevelDB stores it.
# A byte-at-a-time loop in Python would take minutes on BERT-Base's 440 MB, so big buffers are cut into many lanes
# that numpy advances together, two bytes of every lane a step; the lanes' CRCs are then joined with the operator that
# advances a CRC over n zero bytes (CRC is linear: crc(A + B) = shift(crc(A), len(B)) ^ crc(B), from a zero start).

_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _crc_table()


@lru_cache(maxsize=None)
def _table16() -> np.ndarray:
    """The register after two bytes (a little-endian 16-bit word) from zero: numpy's lanes take two bytes a step."""
    table = np.array(_TABLE, dtype=np.uint32)
    words = np.arange(1 << 16, dtype=np.uint32)
    first = table[words & 0xFF]
    return table[(first ^ (words >> 8)) & 0xFF] ^ (first >> 8)


def _advance(register: int, data) -> int:
    """The raw CRC register (no pre- or post-inversion) after `data`, a byte at a time: for short buffers."""
    table = _TABLE
    for b in bytes(data):
        register = table[(register ^ b) & 0xFF] ^ (register >> 8)
    return register


def _apply(operator: tuple[int, ...], value: int) -> int:
    """A linear map on 32-bit registers, given as the images of the 32 unit vectors, applied to `value`."""
    out, bit = 0, 0
    while value:
        if value & 1:
            out ^= operator[bit]
        value >>= 1
        bit += 1
    return out


@lru_cache(maxsize=None)
def _zeros(log2_n: int) -> tuple[int, ...]:
    """The operator that advances a register over 2**log2_n zero bytes (squared from the one-byte operator)."""
    if log2_n == 0:
        return tuple(_advance(1 << i, b"\0") for i in range(32))
    half = _zeros(log2_n - 1)
    return tuple(_apply(half, _apply(half, 1 << i)) for i in range(32))


@lru_cache(maxsize=None)
def _zeros_tables(log2_n: int) -> np.ndarray:
    """`_zeros(log2_n)` as four byte-indexed tables, to apply it to a numpy array of registers at once."""
    op = _zeros(log2_n)
    return np.array([[_apply(op, b << (8 * k)) for b in range(256)] for k in range(4)], dtype=np.uint32)


def _shift(register: int, n: int) -> int:
    """`register` advanced over n zero bytes."""
    bit = 0
    while n:
        if n & 1:
            register = _apply(_zeros(bit), register)
        n >>= 1
        bit += 1
    return register


def _lanes(data: np.ndarray, log2_size: int) -> int:
    """The raw register (from zero) over `data`, 2**log2_size bytes: lanes of 256+ bytes advanced together by numpy,
    then joined pairwise, each left lane shifted over its right neighbour's length."""
    log2_lanes = min(16, log2_size - 8)
    log2_length = log2_size - log2_lanes
    # (length / 2, lanes) words: each step takes the next two bytes of every lane, in place (allocations would cost
    # more than the arithmetic)
    columns = np.ascontiguousarray(data.reshape(1 << log2_lanes, 1 << log2_length).view("<u2").T)
    registers = np.zeros(1 << log2_lanes, dtype=np.uint32)
    table = _table16()
    for column in columns:
        np.bitwise_xor(registers, column, out=registers)
        low = registers & 0xFFFF
        np.right_shift(registers, 16, out=registers)
        np.bitwise_xor(registers, table.take(low), out=registers)
    while len(registers) > 1:
        t = _zeros_tables(log2_length)
        left = registers[0::2]
        shifted = t[0][left & 0xFF] ^ t[1][(left >> 8) & 0xFF] ^ t[2][(left >> 16) & 0xFF] ^ t[3][left >> 24]
        registers = shifted ^ registers[1::2]
        log2_length += 1
    return int(registers[0])


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object or a numpy array's bytes."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    n, register, pos = len(buf), 0, 0
    # the buffer as pieces of power-of-two sizes, largest first (n's binary digits); the small rest a byte at a time
    for log2_size in range(n.bit_length() - 1, 11, -1):
        if n - pos >= 1 << log2_size:
            piece = buf[pos:pos + (1 << log2_size)]
            register = _shift(register, 1 << log2_size) ^ _lanes(piece, log2_size)
            pos += 1 << log2_size
    register = _advance(register, buf[pos:].tobytes())
    # the standard CRC starts from all ones and inverts at the end: the all-ones start, advanced over n bytes, is
    # what a zero start leaves out
    return _shift(0xFFFFFFFF, n) ^ register ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB's masking (rotate, add a constant), so that a CRC stored inside checksummed data is not itself a CRC."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Protocol-buffer wire format: varints and (field, wire type, value) records, enough for the index's messages


def _varint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise BertkitError(f"{where}: a number cut short or too long; expected {EXPECTED}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _put_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 fields are written as their 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes, where: str, kinds: dict[int, type]):
    """(field number, value) of a protobuf message: ints for varint and fixed fields, bytes for length-delimited.
    `kinds` is the type each known field must have (a damaged file can give a field number the other wire type);
    fields of other numbers are skipped, as protobuf skips fields it does not know."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, where)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise BertkitError(f"{where}: a field cut short; expected {EXPECTED}")
            value = int.from_bytes(buf[pos:pos + size], "little")
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos, end, where)
            if pos + size > end:
                raise BertkitError(f"{where}: a field cut short; expected {EXPECTED}")
            value = buf[pos:pos + size]
            pos += size
        else:  # groups (3, 4) are not in these messages; 6 and 7 do not exist
            raise BertkitError(f"{where}: protobuf wire type {wire}; expected {EXPECTED}")
        if number not in kinds:
            continue
        if not isinstance(value, kinds[number]):
            raise BertkitError(f"{where}: field {number} is {'bytes' if isinstance(value, bytes) else 'a number'}; "
                               f"expected {EXPECTED}")
        yield number, value


def _field(number: int, value) -> bytes:
    """One protobuf field: an int as a varint, bytes length-delimited (fixed32 fields are written by the caller)."""
    if isinstance(value, (bytes, bytearray)):
        return _put_varint(number << 3 | 2) + _put_varint(len(value)) + bytes(value)
    return _put_varint(number << 3) + _put_varint(value)


# TensorFlow's DataType enum (types.proto) for the dtypes a BERT checkpoint holds or bertkit can load: floats for
# weights, integers for counters such as global_step.
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"), 5: np.dtype("<i2"),
          6: np.dtype("i1"), 9: np.dtype("<i8"), 14: "bfloat16", 17: np.dtype("<u2"), 19: np.dtype("<f2"),
          22: np.dtype("<u4"), 23: np.dtype("<u8")}
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
               8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16",
               20: "resource", 21: "variant", 22: "uint32", 23: "uint64"}
_TF_DTYPE = {torch.float32: 1, torch.float16: 19, torch.bfloat16: 14, torch.int32: 3, torch.int64: 9}


@dataclass
class Entry:
    """A BundleEntryProto: where one tensor's bytes are and what they are."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool = False  # a partitioned variable, whose bytes are in slices under other keys

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == 14 else DTYPES[self.dtype].itemsize


def _entry(value: bytes, where: str) -> Entry:
    e = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "crc32c": 0, "sliced": False}
    for number, v in _fields(value, where, {1: int, 2: bytes, 3: int, 4: int, 5: int, 6: int, 7: bytes}):
        if number == 1:
            e["dtype"] = v
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1), bool unknown_rank = 3
            dims = []
            for n, dim in _fields(v, where, {2: bytes, 3: int}):
                if n == 2:
                    dims.append(next((_signed(s) for k, s in _fields(dim, where, {1: int})), 0))
                elif n == 3 and dim:
                    dims.append(-1)
            e["shape"] = tuple(dims)
        elif number == 3:
            e["shard"] = _signed(v)
        elif number == 4:
            e["offset"] = _signed(v)
        elif number == 5:
            e["size"] = _signed(v)
        elif number == 6:
            e["crc32c"] = v
        elif number == 7:
            e["sliced"] = True
    return Entry(**e)


# ---------------------------------------------------------------------------------------------------------------
# The LevelDB table of the .index file

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48  # two block handles of at most 20 bytes, zero-padded to 40, then the magic number
_TRAILER = 5  # after each block: the compression type (0 none, 1 snappy) and the masked CRC-32C of block + type


def _block(data: bytes, offset: int, size: int, path: Path, what: str) -> bytes:
    """A block's contents, its CRC checked and its compression refused unless none."""
    if offset < 0 or size < 0 or offset + size + _TRAILER > len(data):
        raise BertkitError(f"{path}: the {what} at byte {offset:,} ({size:,} bytes) runs past the end of the "
                           f"{len(data):,}-byte file (truncated?); expected {EXPECTED}")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1:offset + size + 5], "little")
    if mask(crc32c(data[offset:offset + size + 1])) != stored:
        raise BertkitError(f"{path}: the {what} at byte {offset:,} does not match its checksum (corrupted); "
                           f"expected {EXPECTED}")
    if kind != 0:
        name = {1: "snappy", 2: "zlib", 3: "lz4", 4: "zstd"}.get(kind, f"type {kind}")
        raise BertkitError(f"{path}: the {what} at byte {offset:,} is {name}-compressed; expected uncompressed "
                           "blocks, which is what TensorFlow's checkpoint writer produces")
    return contents


def _block_entries(contents: bytes, path: Path, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block. Each key shares a prefix with the key before it (LevelDB's prefix
    compression), restarting from a whole key at the offsets listed at the block's end."""
    where = f"{path}: the {what}"
    if len(contents) < 4:
        raise BertkitError(f"{where} is {len(contents)} bytes, too short for its restart count; expected {EXPECTED}")
    restarts = int.from_bytes(contents[-4:], "little")
    end = len(contents) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise BertkitError(f"{where} lists {restarts:,} restart points, which do not fit its {len(contents):,} "
                           f"bytes; expected {EXPECTED}")
    offsets = {int.from_bytes(contents[end + 4 * i:end + 4 * i + 4], "little") for i in range(restarts)}
    entries, pos, key, starts = [], 0, b"", set()
    while pos < end:
        starts.add(pos)
        restart = pos in offsets
        shared, pos = _varint(contents, pos, end, where)
        unshared, pos = _varint(contents, pos, end, where)
        size, pos = _varint(contents, pos, end, where)
        if shared > len(key) or (restart and shared) or pos + unshared + size > end:
            raise BertkitError(f"{where}: a malformed entry after key {key.decode(errors='replace')!r}; expected "
                               f"{EXPECTED}")
        key = key[:shared] + contents[pos:pos + unshared]
        pos += unshared
        entries.append((key, contents[pos:pos + size]))
        pos += size
    # every restart point must be where an entry starts, the first entry among them (an empty block lists just 0)
    if not (offsets <= starts and 0 in offsets) and not (not entries and offsets == {0}):
        raise BertkitError(f"{where}: its restart points do not start entries; expected {EXPECTED}")
    return entries


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table file, in key order."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BertkitError(f"{path}: cannot read ({e.strerror or e}); expected {EXPECTED}") from None
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != _MAGIC:
        found = f"{len(data)} bytes" if len(data) < _FOOTER else "no table magic number at its end"
        raise BertkitError(f"{path}: {found} (not a TensorFlow checkpoint index, or truncated); expected {EXPECTED}")
    footer = data[-_FOOTER:]
    where = f"{path}: the footer"
    _, pos = _varint(footer, 0, 40, where)  # the meta-index block: TensorFlow writes it empty, nothing to read
    _, pos = _varint(footer, pos, 40, where)
    index_offset, pos = _varint(footer, pos, 40, where)
    index_size, pos = _varint(footer, pos, 40, where)
    body = data[:-_FOOTER]
    entries = []
    for n, (_, handle) in enumerate(_block_entries(_block(body, index_offset, index_size, path, "index block"), path,
                                                   "index block")):
        offset, p = _varint(handle, 0, len(handle), f"{path}: the index block")
        size, _ = _varint(handle, p, len(handle), f"{path}: the index block")
        entries += _block_entries(_block(body, offset, size, path, f"data block {n}"), path, f"data block {n}")
    keys = [k for k, _ in entries]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise BertkitError(f"{path}: keys out of order or repeated; expected {EXPECTED}")
    return entries


# ---------------------------------------------------------------------------------------------------------------
# The tensor bundle: the index's entries, and the tensors read from the data file(s)


def checkpoint_prefix(directory: Path) -> Path | None:
    """The checkpoint in a Google folder: `bert_model.ckpt`, else the one the `checkpoint` file TensorFlow keeps
    names (a run_classifier.py output folder: `model.ckpt-3668`), else the only `*.index` in the folder."""
    if (directory / f"{CHECKPOINT_PREFIX}.index").is_file():
        return directory / CHECKPOINT_PREFIX
    state = directory / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"([^"/\\]+)"', state.read_text(errors="replace"), re.M)
        if m and (directory / f"{m.group(1)}.index").is_file():
            return directory / m.group(1)
    found = sorted(directory.glob("*.ckpt*.index"))
    if len(found) > 1:
        raise BertkitError(f"{directory}: several checkpoints ({', '.join(p.name for p in found[:5])}) and no "
                           f"`checkpoint` file naming one; expected {CHECKPOINT_PREFIX}.index or a single checkpoint")
    return found[0].with_suffix("") if found else None


def read_index(index: Path) -> tuple[int, dict[str, Entry]]:
    """(number of data shards, variable name -> entry) of a checkpoint's .index file."""
    table = read_table(index)
    if not table or table[0][0] != b"":
        raise BertkitError(f"{index}: no bundle header (the empty key); expected {EXPECTED}")
    header = dict(_fields(table[0][1], f"{index}: the bundle header", {1: int, 2: int}))
    shards = _signed(header.get(1, 0))
    if header.get(2, 0) != 0:
        raise BertkitError(f"{index}: written big-endian; expected a little-endian checkpoint (as x86 and ARM write)")
    if shards < 1:
        raise BertkitError(f"{index}: the header says {shards} data shards; expected at least 1")
    entries = {}
    for key, value in table[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise BertkitError(f"{index}: a variable name that is not UTF-8 ({key[:40]!r}); "
                               f"expected {EXPECTED}") from None
        entries[name] = _entry(value, f"{index}: entry {name!r}")
    return shards, entries


def _data_file(prefix: Path, shard: int, shards: int) -> Path:
    return prefix.parent / f"{prefix.name}.data-{shard:05d}-of-{shards:05d}"


def _check_entry(name: str, e: Entry, shards: int, sizes: dict[int, int], index: Path) -> None:
    """Raise unless entry `name` is a whole tensor of a supported dtype inside its data file."""
    if e.sliced:
        raise BertkitError(f"{index}: {name} is a partitioned variable (stored in slices); expected whole tensors")
    if e.dtype not in DTYPES:
        raise BertkitError(f"{index}: {name} has dtype {DTYPE_NAMES.get(e.dtype, e.dtype)}; expected float32, "
                           "float16, bfloat16 or an integer type")
    if any(d < 0 for d in e.shape):
        raise BertkitError(f"{index}: {name} has shape {e.shape}; expected a fully known shape")
    if not 0 <= e.shard < shards:
        raise BertkitError(f"{index}: {name} is in shard {e.shard}; expected one of the header's {shards} shards")
    if e.size != math.prod(e.shape) * e.itemsize:
        raise BertkitError(f"{index}: {name} is {e.size:,} bytes for shape {e.shape} of "
                           f"{DTYPE_NAMES[e.dtype]}; expected {math.prod(e.shape) * e.itemsize:,}")
    if e.offset < 0 or e.offset + e.size > sizes[e.shard]:
        path = _data_file(index.with_suffix(""), e.shard, shards)
        raise BertkitError(f"{path}: {sizes[e.shard]:,} bytes, but {name} is at bytes {e.offset:,}-"
                           f"{e.offset + e.size:,} (truncated?); expected {EXPECTED}")


def _shard_sizes(prefix: Path, shards: int) -> dict[int, int]:
    sizes = {}
    for shard in range(shards):
        path = _data_file(prefix, shard, shards)
        if not path.is_file():
            raise BertkitError(f"{path}: not found; expected the data file that {prefix.name}.index names "
                               f"(shard {shard + 1} of {shards})")
        sizes[shard] = path.stat().st_size
    return sizes


def read_arrays(prefix: Path, names=None) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint (all, or those in `names`) as numpy arrays in their stored dtype (bfloat16 as
    raw uint16), each checked against its CRC. The data files are memory-mapped: one copy per tensor, no loop."""
    index = prefix.parent / f"{prefix.name}.index"
    shards, entries = read_index(index)
    sizes = _shard_sizes(prefix, shards)
    maps: dict[int, np.ndarray] = {}
    arrays = {}
    for name, e in entries.items():
        if names is not None and name not in names:
            continue
        _check_entry(name, e, shards, sizes, index)
        if e.shard not in maps:
            path = _data_file(prefix, e.shard, shards)
            maps[e.shard] = np.memmap(path, dtype=np.uint8, mode="r") if sizes[e.shard] else np.zeros(0, np.uint8)
        raw = maps[e.shard][e.offset:e.offset + e.size]
        if mask(crc32c(raw)) != e.crc32c:
            raise BertkitError(f"{_data_file(prefix, e.shard, shards)}: {name}'s bytes do not match the checksum "
                               f"in {index.name} (corrupted); expected {EXPECTED}")
        dtype = np.dtype("<u2") if e.dtype == 14 else DTYPES[e.dtype]
        arrays[name] = np.array(raw).view(dtype).reshape(e.shape)
    return arrays


# ---------------------------------------------------------------------------------------------------------------
# Google's variable names <-> bertkit's (transformers') parameter names

_SKIPPED = re.compile(r"(^|/)(global_step|adam_[mv]|Adam(_\d+)?|lamb_[mv])$")
_HEADS = {  # Google's name -> (bertkit's, whether the matrix is transposed)
    "cls/predictions/output_bias": ("cls.predictions.bias", False),
    "cls/seq_relationship/output_weights": ("cls.seq_relationship.weight", False),
    "cls/seq_relationship/output_bias": ("cls.seq_relationship.bias", False),
    "output_weights": ("classifier.weight", False),  # run_classifier.py: [num_labels, H]
    "output_bias": ("classifier.bias", False),
    "cls/squad/output_weights": ("qa_outputs.weight", False),  # run_squad.py: [2, H], start then end
    "cls/squad/output_bias": ("qa_outputs.bias", False),
}
_LEAVES = {"kernel": ("weight", True), "bias": ("bias", False), "gamma": ("weight", False), "beta": ("bias", False)}


def bertkit_name(name: str) -> tuple[str, bool] | None:
    """bertkit's parameter name for a Google variable, and whether its matrix is transposed; None if unknown."""
    if name in _HEADS:
        return _HEADS[name]
    parts = name.split("/")
    if parts[0] == "bert" and len(parts) == 3 and parts[1] == "embeddings" and parts[2].endswith("_embeddings"):
        return f"bert.embeddings.{parts[2]}.weight", False
    if not name.startswith(("bert/", "cls/predictions/transform/")) or parts[-1] not in _LEAVES:
        return None
    leaf, transposed = _LEAVES[parts[-1]]
    path = ".".join(re.sub(r"^layer_(\d+)$", r"layer.\1", p) for p in parts[:-1])
    return f"{path}.{leaf}", transposed


_HEADS_BACK = {v[0]: k for k, v in _HEADS.items()}


def google_name(key: str) -> tuple[str, bool] | None:
    """Google's variable name for a bertkit parameter (the `bert.`-prefixed state-dict key), and whether its matrix
    is transposed; None for the tied decoder copy, which Google's code does not store."""
    if key in _HEADS_BACK:
        return _HEADS_BACK[key], False
    if key == "cls.predictions.decoder.weight":
        return None
    parts = key.split(".")
    if parts[:2] == ["bert", "embeddings"] and len(parts) == 4 and parts[2].endswith("_embeddings"):
        return f"bert/embeddings/{parts[2]}", False
    leaf = parts[-1]
    body = ".".join(parts[:-1])
    body = re.sub(r"\blayer\.(\d+)\b", r"layer_\1", body).replace(".", "/")
    if body.endswith("LayerNorm"):
        return f"{body}/{'gamma' if leaf == 'weight' else 'beta'}", False
    return (f"{body}/kernel", True) if leaf == "weight" else (f"{body}/bias", False)


def _sort_names(entries: dict[str, Entry]) -> tuple[dict[str, tuple[str, bool]], list[str]]:
    """Google name -> (bertkit name, transposed) for the variables a model uses; and the unknown ones."""
    used, unknown = {}, []
    for name in entries:
        if _SKIPPED.search(name):
            continue
        mapped = bertkit_name(name)
        if mapped is None:
            unknown.append(name)
        else:
            used[name] = mapped
    return used, unknown


def _entries(directory: Path) -> tuple[Path, dict[str, Entry]]:
    prefix = checkpoint_prefix(directory)
    if prefix is None:
        raise BertkitError(f"{directory}: no {CHECKPOINT_PREFIX}.index; expected {EXPECTED}")
    index = prefix.parent / f"{prefix.name}.index"
    _, entries = read_index(index)
    if "bert/embeddings/word_embeddings" not in entries:
        found = ", ".join(list(entries)[:3]) or "nothing"
        raise BertkitError(f"{index}: no bert/embeddings/word_embeddings (found {found}); expected {EXPECTED}, with "
                           "the variable names of Google's modeling.py (a TF2 object-based checkpoint is not read)")
    return prefix, entries


def read_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """bertkit's parameter names and shapes from a Google checkpoint's index alone (no tensor read), so that the
    weights are checked against the config before anything large is allocated."""
    _, entries = _entries(directory)
    used, _ = _sort_names(entries)
    return {key: tuple(reversed(entries[name].shape)) if t else entries[name].shape for name, (key, t) in used.items()}


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """A Google checkpoint's weights under bertkit's names, kernels transposed to torch's [out, in]; optimizer
    slots skipped, unknown variables skipped with a warning."""
    prefix, entries = _entries(directory)
    used, unknown = _sort_names(entries)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        logger.warning("%s.index: not a variable of Google's BERT, skipped: %s%s", prefix, ", ".join(unknown[:5]), more)
    arrays = read_arrays(prefix, set(used))
    state = {}
    for name, (key, transposed) in used.items():
        array = arrays[name]
        if entries[name].dtype == 14:  # bfloat16: numpy has no such type; torch reinterprets the 16 bits
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        state[key] = tensor.T.contiguous() if transposed else tensor
    return state


def load_config(directory: Path) -> BertConfig:
    """A Google folder's config: bert_config.json, plus what it leaves to the scripts and the checkpoint tells: the
    architecture (which heads the checkpoint has) and, for run_classifier.py's head, the number of labels."""
    path = directory / GOOGLE_CONFIG_NAME
    value = read_json(path, "Google's BERT config (bert_config.json)")
    if not isinstance(value, dict):
        raise BertkitError(f"{path}: a JSON {type(value).__name__}; expected a JSON object (Google's bert_config.json)")
    value = dict(value)
    if checkpoint_prefix(directory) is not None and "architectures" not in value:
        _, entries = _entries(directory)
        if "cls/squad/output_weights" in entries:
            value["architectures"] = ["BertForQuestionAnswering"]
        elif "output_weights" in entries:
            value["architectures"] = ["BertForSequenceClassification"]
            shape = entries["output_weights"].shape
            if len(shape) == 2 and shape[0] > 0:
                value.setdefault("num_labels", shape[0])
        elif "cls/seq_relationship/output_weights" in entries:
            value["architectures"] = ["BertForPreTraining"]
        elif "cls/predictions/output_bias" in entries:
            value["architectures"] = ["BertForMaskedLM"]
        else:
            value["architectures"] = ["BertModel"]
    elif "architectures" not in value:  # NVIDIA's: bert_config.json beside a .pt that holds the heads
        from bertkit.checkpoint import heads_of

        value |= heads_of(directory)
    try:
        return BertConfig.from_dict(value)
    except BertkitError as e:
        raise BertkitError(f"{path}: {e}") from None


def is_google_folder(directory: Path) -> bool:
    """A folder in Google's layout: bert_config.json where transformers' config.json would be."""
    return not (directory / "config.json").exists() and (directory / GOOGLE_CONFIG_NAME).is_file()


def vocab_is_cased(vocab_file: Path) -> bool:
    """Whether a bare vocab.txt is for cased text. Google's folders record the casing only in their names
    (uncased_L-12_H-768_A-12, cased_...; its tokenization.py guesses from that), so the vocabulary itself decides:
    an uncased one was built from lower-cased text and holds no word piece that lower-casing changes (the uncased
    BERT vocabulary, as all-MiniLM-L6-v2 ships it, has none of its 30,522), a cased one has thousands (capitalised
    words). More than 1% of the word pieces with letters counts as cased, so a stray token does not flip it."""
    cased = letters = 0
    with open(vocab_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            token = line.rstrip("\n")
            if token.startswith("[") and token.endswith("]"):  # [CLS], [unused0]: special, not text
                continue
            if token.lower() != token.upper():
                letters += 1
                cased += token.lower() != token
    return cased > 0.01 * letters


# ---------------------------------------------------------------------------------------------------------------
# Writing: the same files, as TensorFlow's BundleWriter lays them out

_RESTART_INTERVAL = 16  # LevelDB's default for data blocks (its index block restarts at every entry)
BLOCK_SIZE = 256 << 10  # TensorFlow's: a block is closed once past it (2.20 wrote a 311 KB index as 262,181 + 48,814)


def _build_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        out += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _write_block(f, contents: bytes) -> bytes:
    """Write a block and its trailer; return its handle (offset, size as varints)."""
    offset = f.tell()
    f.write(contents + b"\0" + struct.pack("<I", mask(crc32c(contents + b"\0"))))
    return _put_varint(offset) + _put_varint(len(contents))


def write_table(path, entries: list[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> None:
    """A LevelDB table of `entries` (sorted by key), uncompressed: data blocks of about `block_size` bytes, an empty
    meta-index block, the index block, the footer."""
    index = []
    with open(path, "wb") as f:
        block, size = [], 0
        for i, (key, value) in enumerate(entries):
            block.append((key, value))
            size += len(key) + len(value) + 8
            if size >= block_size or i == len(entries) - 1:
                # the index key is the block's last key: TensorFlow seeks a name to the first block whose index key
                # is not smaller (LevelDB shortens it to a separator, which only saves bytes)
                index.append((key, _write_block(f, _build_block(block, _RESTART_INTERVAL))))
                block, size = [], 0
        meta = _write_block(f, _build_block([], 1))
        handle = _write_block(f, _build_block(index, 1))
        footer = (meta + handle).ljust(40, b"\0") + struct.pack("<Q", _MAGIC)
        f.write(footer)


def write_checkpoint(prefix: Path, arrays: dict[str, np.ndarray], block_size: int = BLOCK_SIZE) -> None:
    """Write `prefix`.index and `prefix`.data-00000-of-00001 holding `arrays` (Google names -> arrays; bfloat16
    given as a torch tensor), as TensorFlow's Saver does: tensors in name order, one shard, version 1."""
    from bertkit.checkpoint import atomic_write

    entries = []

    def write_data(tmp):
        offset = 0
        with open(tmp, "wb") as f:
            for name in sorted(arrays):
                value = arrays[name]
                if isinstance(value, torch.Tensor):
                    dtype = _TF_DTYPE[value.dtype]
                    raw = value.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
                    shape = tuple(value.shape)
                else:
                    dtype = {np.dtype(v): k for k, v in DTYPES.items() if k != 14}[value.dtype.newbyteorder("<")]
                    raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
                    shape = value.shape
                f.write(raw.data)
                shape_proto = b"".join(_field(2, _field(1, d)) for d in shape)
                proto = (_field(1, dtype) + _field(2, shape_proto) + (_field(4, offset) if offset else b"")
                         + _field(5, raw.size) + _put_varint(6 << 3 | 5) + struct.pack("<I", mask(crc32c(raw))))
                entries.append((name.encode("utf-8"), proto))
                offset += raw.size

    atomic_write(prefix.parent / f"{prefix.name}.data-00000-of-00001", write_data)
    header = _field(1, 1) + _field(3, _field(1, 1))  # num_shards 1, little-endian (the default 0), producer 1
    atomic_write(prefix.parent / f"{prefix.name}.index",
                 lambda tmp: write_table(tmp, [(b"", header)] + sorted(entries), block_size))


def google_config(config: BertConfig, source: str) -> dict:
    """bert_config.json for `config`; a variant Google's modeling.py would run differently is an error."""
    problems = []
    if config.hidden_act not in ("gelu", "relu"):
        problems.append(f"hidden_act {config.hidden_act!r} (Google's modeling.py knows gelu and relu)")
    if config.layer_norm_eps != 1e-12:
        problems.append(f"layer_norm_eps {config.layer_norm_eps:g} (Google's layer norm uses 1e-12)")
    if config.is_decoder:
        problems.append("is_decoder (a left-to-right model; Google's BERT attends both ways)")
    if config.attention_window:
        problems.append(f"attention_window {config.attention_window} (Google's BERT attends to every token)")
    if config.bilstm:
        problems.append("bilstm (a BiLSTM before the head)")
    if not config.tied_decoder:
        problems.append("tie_word_embeddings false (Google's masked-LM output is the embedding table)")
    if problems:
        raise BertkitError(f"{source}: {'; '.join(problems)}: not expressible in Google's BERT checkpoint format; "
                           "expected a model its code runs as bertkit does")
    return {name: getattr(config, name) for name in GOOGLE_FIELDS}


GOOGLE_HEADS = ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
                "BertForQuestionAnswering")


def _checked(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """bert_config.json for `model` and its state dict under `bert.`-prefixed names (Google's and NVIDIA's names of
    the encoder all start so); a head or variant their code does not run is an error."""
    from bertkit.checkpoint import check_not_int8

    check_not_int8(model)
    name = type(model).__name__
    if name not in GOOGLE_HEADS:
        raise BertkitError(f"{name}: Google's BERT code has no such head; expected one of {', '.join(GOOGLE_HEADS)}")
    config = google_config(model.config, name)
    state = model.state_dict()
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel
        state = {f"bert.{k}": v for k, v in state.items()}
    return config, state


def _write_config_and_vocab(directory: Path, config: dict, tokenizer) -> None:
    from bertkit.checkpoint import atomic_write_text
    from bertkit.config import write_json

    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / GOOGLE_CONFIG_NAME, config, sort_keys=True)
    if tokenizer is None:
        return
    vocab = "".join(token + "\n" for token in tokenizer.vocab())
    atomic_write_text(directory / "vocab.txt", vocab)
    if vocab_is_cased(directory / "vocab.txt") == tokenizer.lowercase:
        # the folder has no place for the casing: a reader (bertkit, or a user picking --do_lower_case) goes by
        # the vocabulary, which here says the other thing
        logger.warning("%s: the tokenizer is %s but its vocabulary looks %s; bertkit will read this folder as "
                       "%s (Google's and NVIDIA's scripts take --do_lower_case=%s)", directory / "vocab.txt",
                       "uncased" if tokenizer.lowercase else "cased",
                       "cased" if tokenizer.lowercase else "uncased",
                       "cased" if tokenizer.lowercase else "uncased", tokenizer.lowercase)


def save_google(model, directory: Path, tokenizer=None, block_size: int = BLOCK_SIZE) -> None:
    """Write `model` (and its tokenizer's vocab.txt) as a Google folder: bert_config.json, vocab.txt,
    bert_model.ckpt.index and .data-00000-of-00001, with the names and orientations Google's code expects."""
    config, state = _checked(model)
    arrays = {}
    for key, value in state.items():
        mapped = google_name(key)
        if mapped is None:
            continue
        google, transposed = mapped
        # float32 whatever the model holds: Google's variables are float32, and TensorFlow refuses to restore a
        # variable from a tensor of another dtype
        value = value.detach().cpu().float()
        arrays[google] = (value.T if transposed else value).contiguous().numpy()
    _write_config_and_vocab(directory, config, tokenizer)
    write_checkpoint(directory / CHECKPOINT_PREFIX, arrays, block_size)


NVIDIA_CHECKPOINT = "bert_model.pt"
_NVIDIA_FUSED = ("intermediate.dense.", "pooler.dense.", "transform.dense.")  # Linear + activation: `dense_act`


def save_nvidia(model, directory: Path, tokenizer=None) -> None:
    """Write `model` as NVIDIA's BERT recipe (DeepLearningExamples) takes it (`--init_checkpoint`, `--config_file`,
    `--vocab_file`): bert_config.json, vocab.txt and bert_model.pt holding {'model': state dict} under its names
    (fused Linear + activation modules as `dense_act`, the tied decoder stored), the vocabulary rows padded with
    zeros to a multiple of 8, as its scripts pad the model they build from bert_config.json."""
    from bertkit.checkpoint import _VOCAB_ROWS, atomic_write

    config, state = _checked(model)
    vocab = config["vocab_size"]
    padding = -vocab % 8
    out = {}
    for key, value in state.items():
        value = value.detach().cpu().float().contiguous()
        if key.endswith(_VOCAB_ROWS):
            value = torch.cat([value, value.new_zeros(padding, *value.shape[1:])])
        for module in _NVIDIA_FUSED:
            key = key.replace(module, module[:-1] + "_act.")
        out[key] = value
    if "cls.predictions.bias" in out:  # NVIDIA's decoder is a Linear tied to the embeddings: its state holds both
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    _write_config_and_vocab(directory, config, tokenizer)
    atomic_write(directory / NVIDIA_CHECKPOINT, lambda p: torch.save({"model": out}, p))


# ---------------------------------------------------------------------------------------------------------------
# `bertkit convert`


LAYOUTS = ("google", "nvidia", "hf", "composer")


@dataclass
class ConvertConfig:
    """`bertkit convert`: the CLI's flags are these fields."""

    model_dir: str = option("", "the model folder to convert (transformers' layout, Google's or NVIDIA's), a "
                            "Composer checkpoint file (MosaicML's hf_bert recipe: ep1-ba1000-rank0.pt), or a peft "
                            "LoRA adapter folder (adapter_config.json), written with its update merged in",
                            positional=True)
    out: str = option("", "the folder to write", required=True)
    to: Literal["google", "nvidia", "hf", "composer"] = option(
        "", "google: bert_config.json, vocab.txt and bert_model.ckpt.index/.data-00000-of-00001, which "
        "Google's BERT code and tf.train.load_checkpoint read; nvidia: bert_config.json, vocab.txt and "
        "bert_model.pt ({'model': state dict}), which NVIDIA's BERT recipe takes as --init_checkpoint; hf: "
        "config.json, model.safetensors and the tokenizer files, which transformers reads; composer: "
        "composer_checkpoint.pt, a weights-only Composer checkpoint holding the config and tokenizer too, which "
        "MosaicML's recipes load (load_path, load_weights_only)", required=True)
    base: str | None = option(None, "a peft adapter's base model folder or Hub id (default: its adapter_config.json's "
                              "base_model_name_or_path)")
    overwrite: bool = option(False, "write into --out even when it holds files")


def _check_google(model_config: BertConfig, cls, source) -> None:
    """Refuse what Google's layout (and NVIDIA's, which runs Google's architecture) cannot hold."""
    google_config(model_config, str(source))
    if cls.__name__ not in GOOGLE_HEADS:
        raise BertkitError(f"{source}: a {cls.__name__}; Google's BERT code has no such head (expected one of "
                           f"{', '.join(GOOGLE_HEADS)})")


def convert(config: ConvertConfig) -> dict:
    """Write `config.model_dir` in the other layout; returns what was written."""
    from bertkit import adapter, composer_checkpoint
    from bertkit.checkpoint import model_folder, save_pretrained
    from bertkit.model import MODEL_CLASSES
    from bertkit.tokenizer import Tokenizer
    from bertkit.train.rundir import make_dir, new_model_folder

    if config.to not in LAYOUTS:
        raise BertkitError(f"--to is {config.to!r}; expected one of {', '.join(LAYOUTS)}")
    out = new_model_folder(config.out, config.model_dir, config.overwrite, "converted model")
    given = Path(config.model_dir)
    if config.base and not adapter.is_adapter(given):
        raise BertkitError(f"--base with {given}, which has no {adapter.ADAPTER_CONFIG}; expected --base only for a "
                           "peft adapter folder")
    if adapter.is_adapter(given):
        model, tokenizer = adapter.merged(given, config.base)
        cls = type(model)
        if config.to in ("google", "nvidia"):
            _check_google(model.config, cls, given)
    elif given.is_file() or (given.suffix == ".pt" and not given.exists()):  # a Composer checkpoint: config, tokenizer
        source = given  # and weights in one file
        model, tokenizer = composer_checkpoint.load(source)
        cls = type(model)
        if config.to in ("google", "nvidia"):
            _check_google(model.config, cls, source)
    else:
        composer_checkpoint.check_not_sharded(given)
        source = model_folder(config.model_dir)
        model_config = BertConfig.load(source)
        names = model_config.extra.get("architectures") or ["BertModel"]
        cls = next((MODEL_CLASSES[n] for n in names if n in MODEL_CLASSES), None)
        if cls is None:
            raise BertkitError(f"{source}: architecture {', '.join(names)}; expected one of "
                               f"{', '.join(MODEL_CLASSES)}")
        if config.to in ("google", "nvidia"):
            _check_google(model_config, cls, source)  # refused before the weights are read
        model = cls.from_pretrained(source)
        tokenizer = Tokenizer.from_pretrained(source) if (source / "vocab.txt").is_file() or (
            source / "tokenizer.json").is_file() else None
    make_dir(out, "--out")
    if config.to == "google":
        save_google(model, out, tokenizer)
        files = [GOOGLE_CONFIG_NAME, f"{CHECKPOINT_PREFIX}.index", f"{CHECKPOINT_PREFIX}.data-00000-of-00001"]
    elif config.to == "nvidia":
        save_nvidia(model, out, tokenizer)
        files = [GOOGLE_CONFIG_NAME, NVIDIA_CHECKPOINT]
    elif config.to == "composer":
        composer_checkpoint.save_composer(model, out, tokenizer)
        files = [composer_checkpoint.COMPOSER_CHECKPOINT + (" (with the tokenizer)" if tokenizer else "")]
    else:
        save_pretrained(model, out, tokenizer=tokenizer)
        files = ["config.json", "model.safetensors"]
    if tokenizer is not None and config.to != "composer":
        files += ["the tokenizer files"] if config.to == "hf" else ["vocab.txt"]
    return {"out": str(out), "to": config.to, "architecture": cls.__name__, "files": files,
            "lowercase": None if tokenizer is None else tokenizer.lowercase}
