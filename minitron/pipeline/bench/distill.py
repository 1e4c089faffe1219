"""``minitron bench distill``: the KD loss's memory and time against the naive loss and TRL's, and KD throughput.

Prints one JSON object:
- KD loss, forward + backward, at vocab 128256, 2048 tokens, student hidden 512, teacher hidden 768, fp32
  (random tensors). Each case runs in its own process; memory is the peak RSS (``VmHWM``, the process's own) above the RSS
  after setup, with ``MALLOC_MMAP_THRESHOLD_=1048576`` so freed tiles go back to the OS. Cases: ``naive``
  (full logits + autograd), ``trl`` (TRL 1.16's chunked divergence, ``_chunked_divergence_loss`` at beta=0:
  forward KL) and ``ours`` (``minitron.kd_loss.fused_kd_loss``). Ratios: ``kd_loss_memory_ratio`` /
  ``kd_loss_time_ratio`` (ours / naive; targets <= 0.10 / <= 0.6) and ``..._vs_trl`` (targets <= 0.2 / <= 0.6);
  ``..._cpu_time_ratio...`` use process CPU time instead of wall time (steadier on a shared machine).
- ``distill_throughput_ratio``: training tokens/s of distillation / plain LM training of the same student
  (``minitron.distill.StudentLoss`` with and without the teacher, random Llamas; the student has half the
  teacher's layers, i.e. half its parameters as in Minitron's 8B -> 4B). Target >= 0.6. The same ratio for a
  50%-width student is reported too.

    minitron bench distill --out bench/results/distill.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from minitron.config import ConfigError, arg
from minitron.io import write_json
from minitron.pipeline.bench.memory import peak_rss

CASES = ("naive", "trl", "ours")


@dataclass
class BenchDistillConfig:
    vocab: int = arg(128256, "KD loss: vocabulary size")
    tokens: int = arg(2048, "KD loss: tokens")
    student_hidden: int = arg(512, "KD loss: student hidden size")
    teacher_hidden: int = arg(768, "KD loss: teacher hidden size")
    repeats: int = arg(2, "KD loss: timed fwd+bwd calls per case (the fastest is reported; memory = peak)")
    cases: list[str] = arg(list(CASES), "KD loss cases to run (naive, trl, ours)")
    throughput_steps: int = arg(6, "throughput: timed optimizer steps per mode (after one warm-up step)")
    throughput_batch: int = arg(8, "throughput: sequences per step")
    throughput_seq_len: int = arg(256, "throughput: tokens per sequence")
    skip_throughput: bool = arg(False, "only the KD loss part")
    out: str | None = arg(None, "also write the JSON here")

    def __post_init__(self) -> None:
        bad = [c for c in self.cases if c not in CASES]
        if bad:
            raise ConfigError(f"unknown case(s) {bad}; choose from {list(CASES)}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kd_case(case: str, vocab: int, n: int, hs_dim: int, ht_dim: int, repeats: int) -> dict:
    """Run one KD case in this process: setup, then ``repeats`` fwd+bwd; returns time and peak memory above setup."""
    torch.manual_seed(0)
    hs = torch.empty(n, hs_dim).normal_(0, 1).requires_grad_()
    ws = torch.empty(vocab, hs_dim).normal_(0, 0.05).requires_grad_()
    ht = torch.empty(n, ht_dim).normal_(0, 1)
    wt = torch.empty(vocab, ht_dim).normal_(0, 0.05)
    fn = _case_fn(case, hs, ws, ht, wt)
    base = _rss_bytes()
    base_peak = peak_rss()
    times, cpu, loss = [], [], None
    for _ in range(repeats):
        hs.grad = ws.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = peak_rss()
    return {"case": case, "time_s": min(times), "times_s": times, "cpu_s": min(cpu), "peak_extra_bytes": max(0, peak - base),
            "setup_peak_above_rss_bytes": max(0, base_peak - base), "loss": float(loss) / n}


def _case_fn(case, hs, ws, ht, wt):
    if case == "naive":
        from minitron.kd_loss import naive_kd_loss

        def fn():
            with torch.no_grad():
                t = ht @ wt.t()
            return naive_kd_loss(hs @ ws.t(), t)[0]
    elif case == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, hs.shape[0])

        def fn():
            out = _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask, beta=0.0, num_items_in_batch=1)
            return out[0] if isinstance(out, tuple) else out
    else:
        from minitron.kd_loss import fused_kd_loss

        def fn():
            return fused_kd_loss(hs, ws, ht, wt)[0]
    return fn


def run_kd_case_subprocess(case: str, cfg: BenchDistillConfig) -> dict:
    """One KD case in a fresh Python process (so that peaks do not mix)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    args = json.dumps([case, cfg.vocab, cfg.tokens, cfg.student_hidden, cfg.teacher_hidden, cfg.repeats])
    proc = subprocess.run([sys.executable, "-m", "minitron.pipeline.bench.distill", args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


TEACHER = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=4, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False)
STUDENTS = {"depth": dict(num_hidden_layers=4), "width": dict(hidden_size=128, intermediate_size=384)}


def _steps_per_s(module, make_inputs, ids: torch.Tensor, steps: int) -> float:
    """Training steps/s of ``module`` (AdamW, one warm-up step not timed)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = module(**make_inputs(ids), scale=1.0 / ids.numel())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def throughput(cfg: BenchDistillConfig) -> dict:
    """Distillation vs LM-training tokens/s of the same student (random Llamas, fp32 on CPU / bf16 on CUDA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.distill import StudentLoss, base_model, lm_head_weight

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TEACHER)).to(device).eval().requires_grad_(False)
    ids = torch.randint(0, TEACHER["vocab_size"], (cfg.throughput_batch, cfg.throughput_seq_len), device=device)
    tw = lm_head_weight(teacher)

    @torch.no_grad()
    def with_teacher(x):
        return {"input_ids": x, "teacher_hidden": base_model(teacher)(input_ids=x).last_hidden_state,
                "teacher_weight": tw}

    out = {"throughput_tokens_per_step": ids.numel(), "throughput_teacher_params": teacher.num_parameters()}
    for name, shape in STUDENTS.items():
        student = LlamaForCausalLM(LlamaConfig(**{**TEACHER, **shape})).to(device)
        lm = _steps_per_s(StudentLoss(student, kd_weight=0.0, ce_weight=1.0), lambda x: {"input_ids": x}, ids,
                          cfg.throughput_steps)
        kd = _steps_per_s(StudentLoss(student), with_teacher, ids, cfg.throughput_steps)
        out.update({f"{name}_student_params": student.num_parameters(), f"{name}_lm_tokens_per_s": lm * ids.numel(),
                    f"{name}_distill_tokens_per_s": kd * ids.numel(), f"{name}_distill_throughput_ratio": kd / lm})
    out["distill_throughput_ratio"] = out["depth_distill_throughput_ratio"]
    return out


def run(cfg: BenchDistillConfig) -> dict:
    """Run every KD case in its own process, then the throughput comparison; print and return one JSON object."""
    res: dict = {"kd_vocab": cfg.vocab, "kd_tokens": cfg.tokens, "kd_student_hidden": cfg.student_hidden,
                 "kd_teacher_hidden": cfg.teacher_hidden, "dtype": "float32", "torch_threads": torch.get_num_threads(),
                 "load_avg_1m_at_start": os.getloadavg()[0]}
    cases = {}
    for c in cfg.cases:  # each case is logged as it finishes (the whole bench takes minutes)
        cases[c] = run_kd_case_subprocess(c, cfg)
        print(json.dumps(cases[c]), file=sys.stderr, flush=True)
    for c, r in cases.items():
        if "error" in r:
            res[f"{c}_error"] = r["error"]
            continue
        res[f"{c}_time_s"] = round(r["time_s"], 3)
        res[f"{c}_cpu_s"] = round(r["cpu_s"], 3)  # process CPU time: less sensitive to a shared machine
        res[f"{c}_peak_extra_gb"] = round(r["peak_extra_bytes"] / 1e9, 3)
        res[f"{c}_loss_per_token"] = round(r["loss"], 6)
    ok = lambda c: c in cases and "error" not in cases[c]  # noqa: E731
    if ok("ours") and ok("naive"):
        res["kd_loss_memory_ratio"] = cases["ours"]["peak_extra_bytes"] / max(1, cases["naive"]["peak_extra_bytes"])
        res["kd_loss_time_ratio"] = cases["ours"]["time_s"] / cases["naive"]["time_s"]
        res["kd_loss_cpu_time_ratio"] = cases["ours"]["cpu_s"] / cases["naive"]["cpu_s"]
    if ok("ours") and ok("trl"):
        res["kd_loss_memory_ratio_vs_trl"] = cases["ours"]["peak_extra_bytes"] / max(1, cases["trl"]["peak_extra_bytes"])
        res["kd_loss_time_ratio_vs_trl"] = cases["ours"]["time_s"] / cases["trl"]["time_s"]
        res["kd_loss_cpu_time_ratio_vs_trl"] = cases["ours"]["cpu_s"] / cases["trl"]["cpu_s"]
    if not cfg.skip_throughput:
        res.update(throughput(cfg))
    res["load_avg_1m_at_end"] = os.getloadavg()[0]
    res = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res, indent=2))
    if cfg.out:
        write_json(cfg.out, res)
    return res


if __name__ == "__main__":  # worker: one KD case, JSON on the last stdout line
    print(json.dumps(_kd_case(*json.loads(sys.argv[1]))))
