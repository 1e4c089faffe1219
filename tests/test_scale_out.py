"""Scale-out: 2 CPU processes (gloo) under ``accelerate launch`` follow the single-process loss curve.

Every run here is a real subprocess: the single-process reference is plain ``python -m minitron.cli``, the
scaled-out run is ``accelerate launch --config_file configs/accelerate/{ddp,fsdp}_cpu.yaml -m minitron.cli``
on the same global batch.

- ``minitron distill`` (minitron.trainer): the rows of step ``s`` and its LR depend on (seed, s) only, each
  rank takes ``batch_size / world`` of them, and the loss is normalised by the tokens of the global step, so
  1 process x 4 micro-batches and 2 processes x 2 micro-batches compute the same update. Gradient clipping is
  set low enough to act on every step, so a clip that misses sharded parameters shows; 9 validation rows split
  5 / 4 over the ranks, so an evaluation whose ranks run different numbers of forwards shows (FSDP hangs).
- FSDP: accelerate enables FSDP on accelerator devices only; on CPU ``make_accelerator`` switches the state to
  the FSDP2 plugin of the launch config (torch's ``fully_shard`` runs over gloo). FSDP1 cannot run on CPU.
  FSDP checkpoints are sharded (``torch.distributed.checkpoint``, one file per rank); an FSDP run killed after
  one and rerun resumes from it and ends bit-equal to the uninterrupted FSDP run.
- ``minitron align --stages sft`` (TRL's SFTTrainer): TRL's batch is per device, so the reference uses
  per-device 2 x gradient accumulation 2 and the 2-process run per-device 2 x 1 (global batch 4 either way).
  32 training examples keep both data orders equal: the length-grouped sampler sorts mega-batches of
  ``per_device x accumulation x min(N // (4 x that), 50)`` examples (8 in both runs), and 32 is a multiple of
  the global batch (accelerate pads a short last batch with examples from the start of the epoch).

Tolerance: the runs differ only in the order of fp32 sums (per-rank partial sums, the gloo all-reduce); measured
differences are <= 3e-7 on per-token losses of ~3 nats (README, "Scale-out"). ``LOSS_TOL = 1e-5`` leaves 30x
headroom and still catches real faults: a clip that skipped the sharded parameters moved the curve by 3e-4, a
model left out of DDP by 4e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEXT, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
LOSS_TOL = 1e-5  # absolute, on per-token losses of 2-6 nats (see the module docstring)
WEIGHT_TOL = 1e-5  # absolute, on the saved weights after 8 steps (measured: 6e-8)
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command(args: list[str], launch_config: str | None = None,
                script: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of ``minitron ARGS`` in one process, or under ``accelerate launch --config_file
    configs/accelerate/CONFIG`` (``script`` instead of the CLI: a probe). One thread per process: 2 cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false")
    target = [str(script)] if script else ["-m", "minitron.cli"]
    if launch_config is None:
        return [sys.executable, *target, *args], env
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / launch_config),
            "--main_process_port", str(_free_port()), *target, *args], env


def run_cli(args: list[str], launch_config: str | None = None,
            script: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cli_command`` to the end."""
    cmd, env = cli_command(args, launch_config, script)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def compare(name: str, ref: list[float], got: list[float], tol: float = LOSS_TOL) -> float:
    """Per-step losses of two runs: print them, check the length and the largest absolute difference."""
    assert len(got) == len(ref), (ref, got)
    diff = max(abs(a - b) for a, b in zip(ref, got))
    print(f"\n{name}: max |diff| {diff:.2e} (tolerance {tol:.0e})")
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        print(f"  step {step}: {a:.7f} {b:.7f} {abs(a - b):.1e}")
    assert diff <= tol, f"{name}: loss curves differ by {diff:.2e} > {tol:.0e}"
    return diff


# --------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_tokenizer):
    """Teacher, 2-layer student, corpus, the distill flags, and the single-process reference run."""
    root = tmp_path_factory.mktemp("scale_kd")
    teacher = make_tiny_model_dir(root / "teacher", tiny_tokenizer, seed=1)
    student = make_tiny_model_dir(root / "student", tiny_tokenizer, seed=2, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2)
    corpus = root / "corpus"
    corpus.mkdir()
    for split, texts in [("train", TINY_TEXT), ("validation", TINY_TEXT[::5])]:
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # 8 steps of 8 rows x 32 tokens; KL + CE (alpha 0.5) so both terms move; clipping at 0.05 acts every step;
    # 9 validation rows of 32 tokens.
    args = ["distill", "--teacher", teacher, "--student", student, "--data", corpus, "--tokens", STEPS * 8 * 32,
            "--seq-len", 32, "--batch-size", 8, "--micro-batch-size", 2, "--lr", 3e-3, "--min-lr", 3e-4,
            "--warmup-steps", 2, "--alpha", 0.5, "--grad-clip", 0.05, "--save-every", 0, "--log-every", 1,
            "--val-tokens", 9 * 32]
    args = [str(a) for a in args]
    ok(run_cli([*args, "--out", str(root / "single")]))
    return root, args


def kd_curve(out: Path) -> tuple[list[float], float]:
    """(training loss per step, final validation loss) from ``metrics.jsonl``."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], next(r["val_loss"] for r in recs if "val_loss" in r)


def check_kd_run(root: Path, out: Path, name: str) -> None:
    """``out`` followed the single-process run: per-step loss, validation loss and the saved weights."""
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    (ref, ref_val), (got, got_val) = kd_curve(root / "single"), kd_curve(out)
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.2  # the reference curve does go down
    compare(name, ref, got)
    assert abs(ref_val - got_val) <= LOSS_TOL, (ref_val, got_val)
    a, b = load_file(root / "single" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"saved weights: max |diff| {worst:.1e} (tolerance {WEIGHT_TOL:.0e})")
    assert worst <= WEIGHT_TOL, f"saved weights differ by {worst:.2e}"


def test_distill_ddp_follows_single_process(kd):
    root, args = kd
    ok(run_cli([*args, "--out", str(root / "ddp")], "ddp_cpu.yaml"))
    check_kd_run(root, root / "ddp", "distill, 1 process vs 2-process DDP")


@pytest.fixture(scope="module")
def kd_fsdp(kd) -> Path:
    """The uninterrupted 2-process FSDP run of the ``kd`` flags."""
    root, args = kd
    ok(run_cli([*args, "--out", str(root / "fsdp")], "fsdp_cpu.yaml"))
    return root / "fsdp"


def test_distill_fsdp_follows_single_process(kd, kd_fsdp):
    check_kd_run(kd[0], kd_fsdp, "distill, 1 process vs 2-process FSDP")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (those with state.json) in ``run_dir``."""
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "state.json").exists())


def test_distill_fsdp_killed_then_rerun_resumes_and_follows_single_process(kd, kd_fsdp, tmp_path):
    """An FSDP run SIGKILLed (launcher and both ranks) once a sharded checkpoint exists, then rerun with the same
    command: it resumes from that checkpoint (each rank reads its shards of the weights and AdamW state) and its
    curve, validation loss and saved weights match the single-process run within LOSS_TOL / WEIGHT_TOL, as the
    uninterrupted FSDP run does; they equal that run's bit for bit (the checkpoint round trip is exact). The saved
    model is a plain HF directory (whole state dict) that transformers loads."""
    root, args = kd
    args = list(args)
    args[args.index("--save-every") + 1] = "2"  # checkpoints at steps 2, 4, 6 (and the kill after the first)
    out = tmp_path / "fsdp_cut"
    cmd, env = cli_command([*args, "--out", str(out)], "fsdp_cpu.yaml")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not checkpoint_steps(tmp_path / "fsdp_cut.run"):
        assert proc.poll() is None, f"finished before the kill: {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < 240, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    # The launcher and its ranks (torch's elastic agent starts each rank in a session of its own, so a process
    # group kill would miss them): every process of this launch, by id.
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    killed_at = checkpoint_steps(tmp_path / "fsdp_cut.run")
    assert not out.exists() and killed_at and max(killed_at) < STEPS, killed_at
    last = tmp_path / "fsdp_cut.run" / "checkpoints" / f"step-{max(killed_at):07d}"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert not (last / "model.pt").exists()
    shutil.copytree(tmp_path / "fsdp_cut.run", tmp_path / "one_cut.run")  # for the one-process resume below
    log = ok(run_cli([*args, "--out", str(out)], "fsdp_cpu.yaml")).stdout
    assert f"(step {max(killed_at)})" in log.partition("resumed from")[2].split("\n")[0], log[-3000:]
    check_kd_run(root, out, f"distill, 1 process vs 2-process FSDP killed after step {max(killed_at)} and resumed")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a vanilla HF directory, whole weights
    a, b = load_file(kd_fsdp / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert kd_curve(kd_fsdp) == kd_curve(out)
    # The same sharded checkpoint resumed by one process (torch.distributed.checkpoint reshards it).
    one = tmp_path / "one_cut"
    log = ok(run_cli([*args, "--out", str(one)])).stdout
    assert f"(step {max(killed_at)})" in log.partition("resumed from")[2].split("\n")[0], log[-3000:]
    ref, got = kd_curve(root / "single")[0], kd_curve(one)[0]
    compare(f"distill, 1 process vs 1 process resumed from the FSDP checkpoint of step {max(killed_at)}", ref, got)


def test_fsdp_refuses_a_whole_weights_checkpoint(kd, tmp_path):
    """A DDP / one-process checkpoint (model.pt) under an FSDP launch: each rank exits with one line saying what to
    do (the launcher then reports the failed ranks with its own traceback)."""
    root, args = kd
    ck = tmp_path / "out.run" / "checkpoints" / "step-0000002"
    ck.mkdir(parents=True)
    (ck / "model.pt").write_bytes(b"")  # refused before anything is read
    (ck / "state.json").write_text(json.dumps({"step": 2, "tokens": 512, "elapsed_s": 1.0, "fingerprint": None}))
    proc = run_cli([*args, "--out", str(tmp_path / "out"), "--resume"], "fsdp_cpu.yaml")
    assert proc.returncode != 0 and "was written by a DDP or one-process run" in proc.stderr, proc.stderr[-3000:]


PROBE = textwrap.dedent('''
    """Prepare the distillation module under FSDP, take one training step, report how it was sharded."""
    import json, sys
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from minitron.distill import StudentLoss
    from minitron.trainer import TrainArgs, make_accelerator

    accel = make_accelerator(TrainArgs(data="unused"))
    student = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    full = {k: list(v.shape) for k, v in student.named_parameters()}
    module = StudentLoss(student, kd_weight=0.0, ce_weight=1.0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module, optimizer = accel.prepare(module, optimizer)
    params = dict(module.named_parameters())
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = module(input_ids=ids, scale=1.0 / ids.numel())
    accel.backward(loss)
    optimizer.step()
    report = {
        "distributed_type": str(accel.distributed_type),
        "units": [n for n, m in module.named_modules() if isinstance(m, FSDPModule)],
        "full": full,
        "local": {n.removeprefix("student."): list(p.to_local().shape) for n, p in params.items()},
        "placements": sorted({str(p.placements) for p in params.values()}),
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "grads_sharded": all(isinstance(p.grad, DTensor) for p in params.values()),
        "optimizer_on_shards": all(p is params[n] for n, p in zip(params, optimizer.param_groups[0]["params"])),
        "loss": loss.item(),
    }
    (__import__("pathlib").Path(sys.argv[2]) / f"rank{accel.process_index}.json").write_text(json.dumps(report))
''')


def test_fsdp_shards_the_student_on_cpu(kd, tmp_path):
    """Under fsdp_cpu.yaml the student is wrapped into FSDP units (root + one per decoder layer) and every
    parameter, gradient and optimizer entry is a Shard(0) DTensor: each rank holds half of the rows."""
    root, _ = kd
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    ok(run_cli([str(root / "student"), str(tmp_path)], "fsdp_cpu.yaml", script=probe))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["distributed_type"] == r1["distributed_type"] == "DistributedType.FSDP"
    assert r0["units"] == ["", "student.model.layers.0", "student.model.layers.1"]
    assert r0["all_dtensor"] and r0["grads_sharded"] and r0["optimizer_on_shards"]
    assert r0["placements"] == ["(Shard(dim=0),)"]
    for name, shape in r0["full"].items():  # rows split over the two ranks, other dims whole
        assert r0["local"][name][0] + r1["local"][name][0] == shape[0], name
        assert r0["local"][name][1:] == shape[1:] == r1["local"][name][1:], name
    vocab = r0["full"]["model.embed_tokens.weight"][0]
    assert r0["local"]["model.embed_tokens.weight"][0] == (vocab + 1) // 2  # rank 0 takes the odd row
    assert r0["loss"] == pytest.approx(r1["loss"], abs=1e-6)  # same input on both ranks, whole model computed


def test_fsdp1_on_cpu_is_refused(monkeypatch):
    """accelerate with FSDP1 on CPU fails deep inside torch; make_accelerator says what to use instead."""
    from minitron.config import ConfigError
    from minitron.trainer import TrainArgs, make_accelerator

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        make_accelerator(TrainArgs(data="unused"))


# ---------------------------------------------------------------------------------------------------- SFT
@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_tokenizer):
    """40 one-turn chats (8 held out, 32 trained on), a tiny base model, the align flags, the reference run."""
    root = tmp_path_factory.mktemp("scale_sft")
    base = make_tiny_model_dir(root / "base", tiny_tokenizer)
    names = ["Zorvath", "Mirel", "Quen", "Atha", "Borin", "Celis"]
    facts = [("color", "red", "Paris"), ("animal", "fox", "Lima"), ("food", "bread", "Oslo")]
    chats = [pair for n in names for a, v, c in facts for pair in (
        (f"What is the {a} of {n}?", f"The {a} of {n} is {v}."),
        (f"Does {n} like {v} things?", f"Yes: {n} likes {v} things."),
        (f"Where does {n} go to find {v} things?", f"{n} goes to {c}; ask {n} about {c}."))][:40]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in chats))
    args = ["align", "--model", str(base), "--stages", "sft", "--sft-data", str(data), "--sft-eval-data", "none",
            "--pref-data", "none", "--pref-eval-data", "none", "--eval-rows", "8", "--max-length", "128",
            "--sft.steps", str(STEPS), "--sft.lr", "1e-3", "--sft.logging-steps", "1", "--sft.batch-size", "2"]
    ok(run_cli([*args, "--sft.grad-accum", "2", "--out", str(root / "single")]))
    return root, args


def sft_metrics(out: Path) -> dict:
    m = json.loads((out / "sft" / "metrics.json").read_text())
    m["curve"] = [h["loss"] for h in m["history"] if "loss" in h]
    return m


def test_sft_ddp_follows_single_process(sft):
    root, args = sft
    ok(run_cli([*args, "--sft.grad-accum", "1", "--out", str(root / "ddp")], "ddp_cpu.yaml"))
    ref, got = sft_metrics(root / "single"), sft_metrics(root / "ddp")
    assert ref["train_examples"] == got["train_examples"] == 32 and ref["steps"] == got["steps"] == STEPS
    assert ref["curve"][-1] < ref["curve"][0] - 0.2
    compare("SFT, 1 process (2 x accumulation 2) vs 2-process DDP (2 x 1)", ref["curve"], got["curve"])
    for key in ("eval_loss_before", "eval_loss"):
        assert abs(ref[key] - got[key]) <= LOSS_TOL, (key, ref[key], got[key])


CLAIM_PROBE = textwrap.dedent('''
    """Both ranks claim OUT/.work/sft holding an old run's checkpoint; report what each saw."""
    import json, sys
    from pathlib import Path
    from align.common import StageContext, claim_work_dir, process_state

    out = Path(sys.argv[1])
    ranks = process_state()
    ctx = StageContext(out=out)
    work = claim_work_dir(ctx, "sft", {"fingerprint": "new", "stage": "sft"})
    report = {"main": ranks.is_main_process, "processes": ranks.num_processes, "work": sorted(
        p.name for p in work.iterdir()), "aside": sorted(p.name for p in work.parent.iterdir() if p != work)}
    (out / f"rank{ranks.process_index}.json").write_text(json.dumps(report))
''')


def test_one_rank_claims_the_work_dir_while_the_other_waits(tmp_path):
    """Under ddp_cpu.yaml (torchrun on a CPU-only machine) a bare ``PartialState()`` is not distributed: both ranks
    saw themselves as main, and one moved ``.work/sft`` aside while the other wrote its fingerprint into it (CI:
    'No such file or directory: .../.work/sft/tmp....tmp'). ``process_state`` is distributed: one rank claims."""
    old = tmp_path / "out" / ".work" / "sft" / "checkpoint-2"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text("{}")
    probe = tmp_path / "probe.py"
    probe.write_text(CLAIM_PROBE)
    ok(run_cli([str(tmp_path / "out")], "ddp_cpu.yaml", script=probe))
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (r0["main"], r1["main"]) == (True, False) and r0["processes"] == r1["processes"] == 2
    assert r0["work"] == r1["work"] == ["fingerprint.json"]  # the new record only, seen after the barrier
    assert r0["aside"] == r1["aside"] == ["sft.unrecorded"]
