"""A model directory's safetensors weights, one tensor (or one block of rows) at a time.

Reading goes through the library (``safetensors.safe_open``: shapes and dtypes from ``get_slice``, one read per
open file handle, so nothing stays mapped after a read). A tensor over ``ROW_BLOCK_BYTES`` is read a block of
rows at a time: the library's memory-mapped tensor is a view of the file, so copying it whole would hold the
tensor twice (the mapped file pages and the copy, 2 GiB for an 8B model's embedding); ``row_blocks`` lets a
caller never hold it at all. Writing streams tensors, or their row blocks, into a shard whose header is known in
advance (the library can only write tensors that are all in memory at once). Either way the resident memory is
what the caller holds, whatever the shard size: an 8B-parameter checkpoint prunes in about 1.5 GiB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from minitron.config import MinitronError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ROW_BLOCK_BYTES = 64 * 2**20  # tensors above this are read (and may be written) in blocks of rows of about this size


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory (from its index when sharded)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    raise MinitronError(f"{d}: no model.safetensors or model.safetensors.index.json")


class ShardedCheckpoint:
    """The tensors of a (sharded) safetensors checkpoint: names, shapes and dtypes up front, data on ``read``."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.entries: dict[str, tuple[Path, torch.dtype, list[int]]] = {}  # name -> (file, dtype, shape)
        for path in weight_files(self.dir):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.entries[key] = (path, DTYPES[sl.get_dtype()], list(sl.get_shape()))

    def keys(self) -> list[str]:
        return list(self.entries)

    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.entries.values())

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a fresh CPU tensor in its stored dtype); a large one is filled block by block, so
        reading it takes its own size plus one block."""
        path, dtype, shape = self._entry(key)
        if math.prod(shape) * dtype.itemsize <= ROW_BLOCK_BYTES or not shape:
            with safe_open(path, "pt") as f:
                return f.get_tensor(key).clone()
        out = torch.empty(shape, dtype=dtype)
        for start, block in self.row_blocks(key):
            out[start:start + block.shape[0]] = block
        return out

    def rows_per_block(self, key: str) -> int:
        """How many rows of ``key`` make a block of about ``ROW_BLOCK_BYTES`` (at least one)."""
        _, dtype, shape = self._entry(key)
        return max(1, ROW_BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (a fresh tensor): only those bytes are read, and mapped only while
        they are copied."""
        with safe_open(self._entry(key)[0], "pt") as f:
            return f.get_slice(key)[start:stop].clone()

    def row_blocks(self, key: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block) over tensor ``key`` in blocks of ``rows_per_block`` rows, in order."""
        n, step = self._entry(key)[2][0], self.rows_per_block(key)
        for start in range(0, n, step):
            yield start, self.read_rows(key, start, min(n, start + step))

    def _entry(self, key: str) -> tuple[Path, torch.dtype, list[int]]:
        if key not in self.entries:
            raise MinitronError(f"{self.dir}: tensor {key} not found in the checkpoint")
        return self.entries[key]

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix``, keyed without it."""
        return {k[len(prefix):]: self.read(k) for k in self.entries if k.startswith(prefix)}


def stored_parameters(model_dir: str | Path | None) -> int | None:
    """Parameters stored in a model directory's weights (from the files' headers; nothing is loaded), or None."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    try:
        return sum(math.prod(shape) for _, _, shape in ShardedCheckpoint(model_dir).entries.values()) or None
    except MinitronError:
        return None


def write_shard(path: Path, specs: list[tuple[str, torch.Size, torch.dtype]],
                produce: Callable[[int], torch.Tensor | Iterable[torch.Tensor]]) -> None:
    """Write a safetensors file of the tensors ``specs`` ((name, shape, dtype), in file order), streaming
    ``produce(i)`` into it: the i-th tensor, or an iterable of its blocks of rows in order (consecutive slices
    along dim 0). Only the tensor, or the block, being written is in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, shape, dtype) in enumerate(specs):
            out = produce(i)
            if isinstance(out, torch.Tensor):
                if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
                    raise MinitronError(f"{path}: tensor {name} is {tuple(out.shape)} {out.dtype}, its header says "
                                        f"{tuple(shape)} {dtype}")
                fh.write(out.contiguous().view(-1).view(torch.uint8).numpy().data)
                continue
            rows = 0
            for t in out:
                if not shape or tuple(t.shape[1:]) != tuple(shape[1:]) or t.dtype != dtype:
                    raise MinitronError(f"{path}: a block of tensor {name} is {tuple(t.shape)} {t.dtype}, its "
                                        f"header says {tuple(shape)} {dtype}")
                rows += t.shape[0]
                fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            if not shape or rows != shape[0]:
                raise MinitronError(f"{path}: the blocks of tensor {name} have {rows} rows, its header says "
                                    f"{tuple(shape)}")
