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
