"""Read a GGUF file (llama.cpp's format): its metadata and its tensors, dequantized to fp32.

    gguf = GGUFFile(path)
    gguf.metadata["general.architecture"]       # "llama", "qwen2", "qwen3", "gemma3", ...
    gguf.tensor_names                           # ["token_embd.weight", "blk.0.attn_q.weight", ...]
    tensors = gguf.dequantized()                # name -> fp32 torch tensor, shaped (out, in), read when asked for

The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:

    "GGUF"  version: u32  n_tensors: u64  n_metadata: u64
    n_metadata × (key: string, value type: u32, value)      string = u64 length + UTF-8 bytes
    n_tensors  × (name: string, n_dims: u32, dims: n_dims × u64, GGML type: u32, offset: u64)
    padding to `general.alignment` (32), then the tensor data, each tensor at its offset

An array value is (item type: u32, count: u64, items). gguf-py's GGUFReader reads all this too, but
it builds a Python object per array item, which takes about a minute for a 262,144-token vocabulary;
read here, numeric arrays are one numpy view and strings one loop (about a second). Dequantizing is
gguf-py's (`gguf.quants.dequantize`), the reference implementation of every GGML block format.
"""
import mmap
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# GGML tensor types we dequantize with gguf.quants.dequantize; anything else is refused by name
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# metadata value types: number -> numpy dtype (strings, arrays and bools are read by hand)
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            10: np.uint64, 11: np.int64, 12: np.float64}
_BOOL, _STRING, _ARRAY = 7, 8, 9
DEQUANTIZE_CHUNK_BYTES = 4 * 2**20  # quantized bytes dequantized at a time


class GGUFFile:
    """A GGUF file's metadata (dict: key -> int, float, bool, str or list) and tensor table, read from a
    memory map; ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._read_header()
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as error:
            raise ValueError(f"{self.path} is corrupt or truncated ({error}); delete it and download again") \
                from None

    # --- the header ------------------------------------------------------------------------------

    def _unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self._data, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def _string(self) -> str:
        length = self._unpack("Q")
        text = self._data[self._pos:self._pos + length]
        if len(text) != length:
            raise ValueError("a string runs past the end of the file")
        self._pos += length
        return text.decode("utf-8")

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _BOOL:
            return bool(self._unpack("B"))
        if kind == _ARRAY:
            item_kind, count = self._unpack("IQ")
            if item_kind in _SCALARS:  # one numpy read for the whole array
                items = np.frombuffer(self._data, _SCALARS[item_kind], count, self._pos)
                self._pos += items.nbytes
                return items.tolist()
            return [self._value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        value = np.frombuffer(self._data, _SCALARS[kind], 1, self._pos)[0]
        self._pos += value.nbytes
        return value.item()

    def _read_header(self):
        if self._data[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        self._pos = 4
        self.version, n_tensors, n_metadata = self._unpack("IQQ")
        self.metadata = {}
        for _ in range(n_metadata):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I"))
        self._tensors = {}  # name -> (GGML type number, dims fastest-first, offset)
        for _ in range(n_tensors):
            name = self._string()
            dims = self._unpack(f"{self._unpack('I')}Q")
            dims = dims if isinstance(dims, tuple) else (dims,)
            kind, offset = self._unpack("IQ")
            self._tensors[name] = (kind, dims, offset)
        alignment = self.metadata.get("general.alignment", 32)
        self._data_start = -(-self._pos // alignment) * alignment
        if self._tensors:
            last = max(self._tensors, key=lambda n: self._tensors[n][2])
            if self._data_start + self._tensors[last][2] + self._nbytes(last) > len(self._data):
                raise ValueError(f"tensor {last} runs past the end of the file")

    # --- tensors -----------------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        import gguf
        return gguf.GGMLQuantizationType(self._tensors[name][0]).name

    def _nbytes(self, name: str) -> int:
        import gguf
        kind, dims, _ = self._tensors[name]
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        return int(np.prod(dims)) // block_size * block_bytes

    def dequantized(self) -> "DequantizedTensors":
        """Every tensor as fp32, shaped like PyTorch's (out, in), dequantized one at a time when asked for
        (a mapping: name -> tensor). GGUF lists dimensions fastest-first, so (in, out), and its numpy
        arrays come out already in (out, in) order."""
        return DequantizedTensors(self)

    def read_dequantized(self, name: str) -> torch.Tensor:
        import gguf

        kind, dims, offset = self._tensors[name]
        type_name = self.tensor_type(name)
        if type_name not in TENSOR_TYPES:
            raise ValueError(f"{self.path}: tensor {name} has GGML type {type_name}, which we cannot "
                             f"dequantize; supported: {', '.join(TENSOR_TYPES)}")
        # rows (the fastest dimension, whole quantization blocks) a few MiB at a time, into the output: the
        # dequantizer's temporaries stay small even for a 262,144-row embedding. Plain reads, not the
        # memory map: mapped pages stay resident and would add the whole file to the loading peak.
        shape = tuple(int(n) for n in reversed(dims))
        out = torch.empty(shape, dtype=torch.float32)
        rows = out.view(-1, shape[-1])  # (rows, row length)
        row_bytes = self._nbytes(name) // len(rows)
        step = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, row_bytes))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + offset)
            for first in range(0, len(rows), step):
                chunk = rows[first:first + step]
                raw = np.empty(len(chunk) * row_bytes, np.uint8)
                f.readinto(memoryview(raw))
                values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind))
                chunk.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(chunk.shape)))
        return out


class DequantizedTensors(Mapping):
    """A GGUF file's tensors by name, each read and dequantized to fp32 when asked for; iterating over
    items() shows a progress bar."""

    def __init__(self, gguf_file: GGUFFile):
        self.file = gguf_file

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.file._tensors:
            raise KeyError(name)
        return self.file.read_dequantized(name)

    def __contains__(self, name) -> bool:
        return name in self.file._tensors

    def __iter__(self):
        return iter(self.file._tensors)

    def __len__(self) -> int:
        return len(self.file._tensors)

    def items(self):
        for name in tqdm(self.file._tensors, desc=f"dequantizing {self.file.path.name}", unit="tensor",
                         file=sys.stderr):
            yield name, self[name]
