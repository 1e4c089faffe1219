"""Safetensors weights tensor by tensor: the streamed writer's files read back with the library, shapes and
parameter counts from headers only."""

import pytest
import torch
from safetensors.torch import load_file

from minitron.config import MinitronError
from minitron.weights import ShardedCheckpoint, stored_parameters, write_shard


def test_streamed_shard_reads_back_with_the_library(tmp_path):
    tensors = {"a.weight": torch.randn(5, 3), "b.bias": torch.arange(4, dtype=torch.int64),
               "c.norm": torch.randn(7).to(torch.bfloat16)}
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_shard(tmp_path / "model.safetensors", specs, lambda i: tensors[specs[i][0]])
    back = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    ck = ShardedCheckpoint(tmp_path)
    assert ck.entries["a.weight"][1:] == (torch.float32, [5, 3]) and torch.equal(ck.read("c.norm"), tensors["c.norm"])
    assert ck.nbytes() == 5 * 3 * 4 + 4 * 8 + 7 * 2
    assert stored_parameters(tmp_path) == 15 + 4 + 7 and stored_parameters(tmp_path / "none") is None


def test_a_tensor_unlike_its_header_is_refused(tmp_path):
    with pytest.raises(MinitronError, match=r"tensor x is \(2,\) torch.float32, its header says \(3,\)"):
        write_shard(tmp_path / "m.safetensors", [("x", torch.Size([3]), torch.float32)], lambda i: torch.zeros(2))


def test_row_blocks_write_and_read_like_whole_tensors(tmp_path, monkeypatch):
    """A tensor written as blocks of rows is the tensor; read back by blocks (``ROW_BLOCK_BYTES`` small) it is too."""
    import minitron.weights as weights

    big, small = torch.randn(10, 3), torch.randn(2)
    specs = [("big", big.shape, big.dtype), ("small", small.shape, small.dtype)]
    write_shard(tmp_path / "model.safetensors", specs, lambda i: big.split(4) if i == 0 else small)
    back = load_file(tmp_path / "model.safetensors")
    assert torch.equal(back["big"], big) and torch.equal(back["small"], small)
    monkeypatch.setattr(weights, "ROW_BLOCK_BYTES", 2 * 3 * 4)  # 2 rows of big
    ck = ShardedCheckpoint(tmp_path)
    assert ck.rows_per_block("big") == 2 and [a for a, _ in ck.row_blocks("big")] == [0, 2, 4, 6, 8]
    assert torch.equal(ck.read("big"), big) and torch.equal(ck.read_rows("big", 3, 7), big[3:7])


@pytest.mark.parametrize("blocks, message", [
    (lambda: torch.zeros(4, 2).split(2), r"a block of tensor x is \(2, 2\) torch.float32, its header says \(4, 3\)"),
    (lambda: torch.zeros(3, 3).split(2), r"the blocks of tensor x have 3 rows, its header says \(4, 3\)"),
])
def test_blocks_unlike_their_header_are_refused(tmp_path, blocks, message):
    with pytest.raises(MinitronError, match=message):
        write_shard(tmp_path / "m.safetensors", [("x", torch.Size([4, 3]), torch.float32)], lambda i: blocks())
