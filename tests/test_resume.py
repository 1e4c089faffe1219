"""Crash-safe reruns of the core stages: SIGKILL mid-run and the same command continues (bit-equal for distillation);
a changed config redoes the stage in one line and keeps the old checkpoints aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tiny_model_dir
from test_distill import write_corpus
from test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}


@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("resume")
    teacher = make_tiny_model_dir(root / "teacher", tiny_tokenizer, seed=1)
    student = make_tiny_model_dir(root / "student", tiny_tokenizer, seed=2, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2)
    return teacher, student, write_corpus(root / "corpus")


def distill_args(teacher, student, corpus, out, steps: int, **kw) -> list[str]:
    args = {"teacher": teacher, "student": student, "data": corpus, "out": out, "tokens": steps * 4 * 32,
            "seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
            "save_every": 1, "log_every": 1, "val_tokens": 128, **kw}
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def minitron(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minitron.cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (fails if it finishes or times out first)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.stdout.read()[-2000:]}"
        assert time.time() - t0 < timeout, "timed out waiting to kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def checkpoint_steps(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ck.glob("step-*") if (p / "state.json").exists())


def test_distill_killed_then_rerun_is_bit_equal_to_uninterrupted(kd, tmp_path):
    teacher, student, corpus = kd
    steps = 60
    cut = tmp_path / "cut"
    proc = minitron("distill", *distill_args(teacher, student, corpus, cut, steps))
    kill_when(proc, lambda: any(s >= 5 for s in checkpoint_steps(tmp_path / "cut.run")))
    assert proc.returncode == -signal.SIGKILL and not cut.exists()
    rerun = minitron("distill", *distill_args(teacher, student, corpus, cut, steps))
    log = rerun.communicate()[0]
    assert rerun.returncode == 0, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    resumed_from = int(log.split("resumed from ")[1].split("(step ")[1].split(")")[0])
    assert 5 <= resumed_from < steps, log[-2000:]
    full = minitron("distill", *distill_args(teacher, student, corpus, tmp_path / "full", steps))
    assert full.wait() == 0
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, steps + 1))  # no step logged twice
    assert json.loads((cut / "fingerprint.json").read_text())["fingerprint"] == \
        json.loads((tmp_path / "full" / "fingerprint.json").read_text())["fingerprint"]


def test_changed_config_redoes_the_stage_and_sets_old_checkpoints_aside(kd, tmp_path, capsys):
    from minitron.distill import DistillConfig, run

    teacher, student, corpus = kd
    kw = dict(teacher=str(teacher), student=str(student), data=str(corpus), out=str(tmp_path / "s"),
              tokens=6 * 4 * 32, seq_len=32, batch_size=4, micro_batch_size=2, save_every=1, val_tokens=128)
    run(DistillConfig(**kw))
    stamp = (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns
    run(DistillConfig(**kw))
    assert "is up to date" in capsys.readouterr().out
    assert (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns == stamp
    old_fp = json.loads((tmp_path / "s" / "fingerprint.json").read_text())["fingerprint"]
    run(DistillConfig(**{**kw, "lr": 5e-4}))
    said = capsys.readouterr().out
    assert "was made differently (lr 0.0001 -> 0.0005)" in said, said
    assert (tmp_path / f"s.run.{old_fp}" / "checkpoints").is_dir()  # not deleted: set aside
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["steps"] == 6
    assert json.loads((tmp_path / "s" / "fingerprint.json").read_text())["config"]["lr"] == 5e-4


def test_pipeline_killed_mid_distillation_continues_and_redoes_only_what_changed(tmp_path):
    recipe = {**TINY, "out": str(tmp_path / "run"), "students": {"width": TINY["students"]["width"]},
              "rounds": [], "stages": ["world", "teacher", "prune", "distill"],
              "distill": {**TINY["distill"], "tokens": 64 * 4 * 80, "save_every": 1}}
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run" / "distilled" / "width.run"
    proc = minitron("run", "--config", str(f))
    kill_when(proc, lambda: any(s >= 3 for s in checkpoint_steps(run_dir)))
    rerun = minitron("run", "--config", str(f))
    log = rerun.communicate()[0]
    assert rerun.returncode == 0, log[-3000:]
    assert "teacher is up to date" in log and "pruned/width is up to date" in log, log[-3000:]
    assert "resumed from" in log and (tmp_path / "run" / "distilled" / "width" / "fingerprint.json").exists()
    recipe["distill"]["lr"] = 2e-4  # a changed distillation config: only distillation is redone
    f.write_text(yaml.safe_dump(recipe))
    again = minitron("run", "--config", str(f))
    log = again.communicate()[0]
    assert again.returncode == 0, log[-3000:]
    assert "teacher is up to date" in log and "pruned/width is up to date" in log
    assert "distilled/width was made differently (lr 0.0001 -> 0.0002)" in log, log[-3000:]


def test_input_fingerprint_follows_content_not_mtime(tmp_path, monkeypatch):
    """A data set copied afresh (CI, a new checkout: new mtimes, same bytes) is the same input; edited bytes are not."""
    from minitron import fingerprint

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "one"}\n')
    (data / "b.jsonl").write_bytes(os.urandom(5000))
    before = fingerprint.of_path(data)
    os.utime(data / "a.jsonl", (1, 1))  # as a fresh copy would: other times, same bytes
    assert fingerprint.of_path(data) == before
    (data / "a.jsonl").write_text('{"text": "two"}\n')  # same size, other bytes
    assert fingerprint.of_path(data) != before
    monkeypatch.setattr(fingerprint, "_WHOLE", 1024)  # large files are hashed by size and sampled blocks
    monkeypatch.setattr(fingerprint, "_BLOCK", 64)
    big = fingerprint.of_path(data / "b.jsonl")
    raw = bytearray((data / "b.jsonl").read_bytes())
    raw[0] ^= 1  # the first block is always sampled
    (data / "b.jsonl").write_bytes(bytes(raw))
    assert fingerprint.of_path(data / "b.jsonl") != big


def test_an_output_without_record_is_redone_once_what_it_was_made_from_is_remade(tmp_path, capsys):
    """Outputs older than fingerprint records are kept, unless a stage output they were made from was redone since."""
    from minitron import fingerprint

    made_from, out = tmp_path / "sft", tmp_path / "dpo"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    os.utime(out / "model.safetensors", (1_000_000, 1_000_000))
    made_from.mkdir()
    fingerprint.record(made_from, {"fingerprint": "new", "config": {}, "inputs": {}})
    fp = {"fingerprint": "x", "config": {"model": str(made_from), "lr": 1e-5}, "inputs": {}}
    assert not fingerprint.up_to_date(out, fp, "dpo")
    assert "its input model was remade after it: redoing it" in capsys.readouterr().out
    os.utime(made_from / fingerprint.FILE, (1, 1))  # recorded before the output was made: keep the output
    assert fingerprint.up_to_date(out, fp, "dpo")
    assert "made before fingerprints were recorded): keeping it" in capsys.readouterr().out
