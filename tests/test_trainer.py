"""The shared trainer: exact resume, NaN stop, 2-process gloo == 1 process, schedule and data order."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model_dir
from test_distill import write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tr")
    teacher = make_tiny_model_dir(root / "teacher", tiny_tokenizer, seed=1)
    student = make_tiny_model_dir(root / "student", tiny_tokenizer, seed=2, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2)
    return teacher, student, write_corpus(root / "corpus")


def cfg_kw(teacher, student, corpus, out, **kw):
    base = dict(teacher=str(teacher), student=str(student), data=str(corpus), out=str(out), tokens=6 * 4 * 32,
                seq_len=32, batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, save_every=2,
                log_every=1, val_tokens=128)
    base.update(kw)
    return base


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_lr_schedule_and_data_order():
    from minitron.trainer import TrainArgs, lr_at, step_rows

    cfg = TrainArgs(data="x", lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [lr_at(s, 10, cfg) for s in range(11)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and abs(lrs[10] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    rows = torch.cat([step_rows(s, 10, 4, seed=3) for s in range(5)])  # 2 epochs of 10 rows
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:20].tolist()) == list(range(10))
    assert torch.equal(step_rows(3, 10, 4, seed=3), rows[12:16])  # a pure function of (seed, step)


def test_resume_equals_uninterrupted(setup, tmp_path):
    from minitron.distill import DistillConfig, run

    teacher, student, corpus = setup
    full = run(DistillConfig(**cfg_kw(teacher, student, corpus, tmp_path / "full")))
    part = run(DistillConfig(**cfg_kw(teacher, student, corpus, tmp_path / "part", max_steps=3)))
    ckpts = sorted(p.name for p in (tmp_path / "part.run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000003"]
    assert not __import__("json").loads((part / "metrics.json").read_text())["completed"]
    resumed = run(DistillConfig(**cfg_kw(teacher, student, corpus, tmp_path / "part", resume=True)))
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in map(__import__("json").loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated records after resuming


def test_nan_loss_stops_and_keeps_checkpoint(setup, tmp_path):
    from minitron.distill import DistillConfig, run
    from minitron.trainer import TrainingDiverged

    teacher, student, corpus = setup
    cfg = DistillConfig(**cfg_kw(teacher, student, corpus, tmp_path / "nan", tokens=40 * 4 * 32, lr=1e30,
                                 min_lr=1e30, warmup_steps=0, grad_clip=0.0, save_every=1))
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step-") as err:
        run(cfg)
    last = Path(re.search(r"last good checkpoint is (\S+step-\d+)", str(err.value)).group(1))
    assert (last / "model.pt").exists() and (last / "state.json").exists()
    state = torch.load(last / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "nan").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(setup, tmp_path):
    teacher, student, corpus = setup
    kw = cfg_kw(teacher, student, corpus, None, tokens=3 * 4 * 32, micro_batch_size=2, save_every=0)
    args = [a for k, v in kw.items() if k != "out" for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = [sys.executable, "-m", "minitron.cli", "distill", *args, "--out", str(tmp_path / "one")]
    subprocess.run(one, check=True, env=env, cwd=ROOT, capture_output=True)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "minitron.cli", "distill", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(two, env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = __import__("json").loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
