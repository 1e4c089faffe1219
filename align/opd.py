"""Stage ``opd``, on-policy distillation from an aligned teacher: TRL's GKDTrainer (``trl.experimental.gkd``).

The student samples answers to held-in SFT prompts and the teacher (``--opd.teacher DIR``, same tokenizer and
vocabulary) scores every token of them; the loss is the generalised Jensen-Shannon divergence between the two
next-token distributions on the student's own samples (``beta`` 0 = forward KL(teacher || student), 1 = reverse
KL(student || teacher), between = JSD). ``lmbda`` is the share of steps trained on the student's samples (1 = fully
on-policy; the others use the data's answers). It replaces SFT for a pruned student of an aligned teacher (student
= ``--model``, no ``sft`` stage) or follows it (it starts from ``OUT/sft`` when there is one). At lmbda 1 and
temperature 1 TRL 1.16 logs that its stable ``trl.DistillationTrainer`` covers the run; GKDTrainer is kept because it
also does lmbda < 1 (mixing in the data's answers) and is what the tests pin.

Metrics on held-out SFT prompts, before and after, with standard errors: KL(student || teacher) in nats per answer,
a Monte-Carlo estimate on the student's own samples (sum over tokens of log p_student - log p_teacher), and the
teacher-forced loss (mean token NLL of the data's held-out answers). With ``baseline: true`` plain SFT from the same
model on the teacher's greedy answers to the same prompts, at the same steps and batch size, is measured the same way
and saved as ``OUT/opd_baseline`` (a model directory, so the benchmarks can compare the two).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from align.common import (StageContext, StageArgs, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.scoring import completion_logps, mean_se, sample
from minitron.config import ConfigError, MinitronError, arg
from minitron.scoring import chat_ids, continuation_logprobs


@dataclasses.dataclass
class OPDArgs(StageArgs):
    """On-policy distillation settings (``--opd.teacher DIR --opd.beta 1.0``)."""

    teacher: str = arg("", "the aligned teacher's model dir (same tokenizer and vocabulary as the student); required")
    steps: int = arg(100, "optimizer steps (capped by --max-steps)")
    lr: float = arg(5e-5, "peak learning rate")
    batch_size: int = arg(8, "prompts per micro-batch (one student sample each)")
    lmbda: float = arg(1.0, "share of steps on the student's own samples (1 = fully on-policy; else the data's answers)")
    beta: float = arg(0.5, "divergence: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), else JSD")
    temperature: float = arg(1.0, "sampling temperature of the student's answers (training and the held-out KL)")
    max_new_tokens: int = arg(48, "tokens per sampled answer")
    prompts: int = arg(1024, "held-in SFT prompts to train on (the first N of the shuffled examples; tool examples "
                             "are left out)")
    eval_prompts: int = arg(32, "held-out SFT prompts for the before/after KL and teacher-forced loss")
    baseline: bool = arg(False, "also train and measure plain SFT on the teacher's greedy answers to the same prompts "
                                "(same steps and batch size; not saved)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"opd.lmbda and opd.beta must be in [0, 1] (got {self.lmbda}, {self.beta})")
        if self.temperature <= 0 or self.max_new_tokens < 1 or self.prompts < 1 or self.eval_prompts < 1:
            raise ConfigError("opd.temperature must be positive, and opd.max_new_tokens, opd.prompts, "
                              "opd.eval_prompts >= 1")


def check_teacher(args: OPDArgs, student: Path) -> Path:
    """The teacher resolves and shares the student's vocabulary (GKD compares full next-token distributions)."""
    from transformers import AutoConfig

    from minitron.model_source import resolve_model

    if not args.teacher:
        raise MinitronError("the opd stage needs an aligned teacher: pass --opd.teacher DIR")
    teacher = resolve_model(args.teacher, "--opd.teacher")
    tv, sv = (AutoConfig.from_pretrained(str(p)).get_text_config().vocab_size for p in (teacher, student))
    if tv != sv or load_tokenizer(teacher).get_vocab() != load_tokenizer(student).get_vocab():
        raise MinitronError(f"--opd.teacher {teacher}: its tokenizer/vocabulary (vocab_size {tv}) differs from the "
                            f"student's {student} ({sv}); on-policy distillation needs the same tokenizer")
    return teacher


def plain(examples: list[dict], n: int) -> list[dict]:
    """The first ``n`` examples without tool schemas (the samplers render prompts without tools)."""
    return [ex for ex in examples if not ex.get("tools")][:n]


def answer_nll(model: Any, tok: Any, examples: list[dict]) -> torch.Tensor:
    """Teacher-forced loss: mean token NLL of each example's ``completion`` given its ``prompt``: [N]."""
    lengths = [len(chat_ids(tok, ex["prompt"] + ex["completion"])) - len(chat_ids(tok, ex["prompt"],
                                                                                add_generation_prompt=True))
               for ex in examples]
    return -completion_logps(model.eval(), tok, examples, "completion") / torch.tensor(lengths).clamp(min=1)


def kl_samples(student: Any, teacher: Any, tok: Any, examples: list[dict], args: OPDArgs, seed: int) -> torch.Tensor:
    """Per held-out prompt, sum_t [log p_student(y_t) - log p_teacher(y_t)] over one student sample y: [N]."""
    samples = sample(student.eval(), tok, [ex["prompt"] for ex in examples], args.max_new_tokens, seed,
                     args.temperature)
    prompts, comps = [s["prompt_ids"] for s in samples], [s["completion_ids"] for s in samples]
    return (continuation_logprobs(student, prompts, comps, tok.pad_token_id)
            - continuation_logprobs(teacher.eval(), prompts, comps, tok.pad_token_id))


def measure(student: Any, teacher: Any, tok: Any, held: list[dict], args: OPDArgs, seed: int) -> dict[str, float]:
    kl, kl_se = mean_se(kl_samples(student, teacher, tok, held, args, seed))
    nll, nll_se = mean_se(answer_nll(student, tok, held))
    return {"kl": kl, "kl_se": kl_se, "loss": nll, "loss_se": nll_se}


def completion_gkd_trainer() -> type:
    """TRL's GKDTrainer with the same loss computed on the answer positions only.

    TRL's ``compute_loss`` takes the full-vocabulary logits of student and teacher at every position, prompt
    included, and masks the prompt away only after the divergence: on real chat prompts (hundreds of tokens before a
    48-token answer, vocabulary 49k) that is ~6x the logits and divergence work of the answers, several GB of
    tensors per step. Here both models return logits from the first position that predicts a labelled token
    (``logits_to_keep``), so the loss and its gradient are the same (``tests/test_align_ppo_opd_spin.py``).
    """
    from trl.experimental.gkd import GKDTrainer

    class CompletionGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            length = inputs["input_ids"].shape[1]
            labels = inputs["labels"][:, 1:]  # logits at position j predict the token at j + 1
            used = (labels != -100).any(0).nonzero()
            first = int(used[0]) if len(used) else length - 2
            keep = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        logits_to_keep=length - first)  # positions first .. length-1
            student = model(**keep)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher = self.teacher_model(**keep)
            loss = self.generalized_jsd_loss(student_logits=student.logits[:, :-1],
                                             teacher_logits=teacher.logits[:, :-1], labels=labels[:, first:],
                                             beta=self.beta, num_items_in_batch=num_items_in_batch)
            return (loss, student) if return_outputs else loss

    return CompletionGKDTrainer


def teacher_answers(teacher: Any, tok: Any, examples: list[dict], args: OPDArgs) -> list[dict]:
    """The teacher's greedy answers to the prompts, as prompt/completion SFT rows (the baseline's data)."""
    out = sample(teacher.eval(), tok, [ex["prompt"] for ex in examples], args.max_new_tokens, 0, temperature=0)
    return [{"prompt": ex["prompt"], "completion": [{"role": "assistant", "content": s["text"]}]}
            for ex, s in zip(examples, out)]


def _baseline(ctx: StageContext, args: OPDArgs, model_dir: str | Path, teacher: Any, rows: list[dict],
              held: list[dict]) -> dict[str, float]:
    """SFT from ``model_dir`` on the teacher's answers to the training prompts (same steps), measured like OPD."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(model_dir)
    model = freeze(load_causal_lm(model_dir, tok), args)
    need = ctx.steps(args) * args.batch_size * args.grad_accum  # the prompts OPD sees (one sample each)
    data = measured_once(ctx, "opd", "teacher_answers", lambda: teacher_answers(teacher, tok, rows[:need], args))
    work = ctx.work_dir("opd") / "baseline"
    config = trl_args(SFTConfig, args, ctx, "opd", completion_only_loss=True, packing=False, output_dir=str(work),
                      save_strategy="no")
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(data), processing_class=tok,
                         peft_config=peft_config(ctx.lora))
    trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    measured = measure(trainer.model, teacher, tok, held, args, ctx.seed)
    save_stage(trainer.model, tok, ctx, "opd_baseline", dict(measured), args, str(model_dir),
               "SFT on the teacher's answers (OPD's equal-compute baseline)",
               f"Plain SFT on {len(data)} greedy answers of the teacher, the steps and batch size of the OPD run "
               "beside it (OUT/opd): the models the benchmarks compare.")
    return measured


def train(ctx: StageContext, args: OPDArgs, model_dir: str | Path, train_rows: list[dict], held_rows: list[dict],
          data_stats: dict[str, Any]) -> Path:
    """On-policy distillation of ``model_dir`` from ``args.teacher`` on held-in SFT prompts; write ``OUT/opd``."""
    from trl.experimental.gkd import GKDConfig

    teacher_dir = check_teacher(args, Path(model_dir))
    tok = load_tokenizer(model_dir)
    student, teacher = load_causal_lm(model_dir, tok), load_causal_lm(teacher_dir, load_tokenizer(teacher_dir))
    teacher.requires_grad_(False)
    rows, held = plain(train_rows, args.prompts), plain(held_rows, args.eval_prompts)
    if not rows or not held:
        raise MinitronError("opd: no SFT example without tools to train or measure on")
    before = measured_once(ctx, "opd", "heldout", lambda: measure(student, teacher, tok, held, args, ctx.seed))
    teacher_loss = mean_se(answer_nll(teacher, tok, held))
    freeze(student.train(), args)
    # GKD's collator renders "messages"; the prompt is all but the last turn (the answer, used when lmbda < 1)
    data = [{"messages": ex["prompt"] + ex["completion"]} for ex in rows]
    config = trl_args(GKDConfig, args, ctx, "opd", lmbda=args.lmbda, beta=args.beta, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens)
    trainer = completion_gkd_trainer()(model=student, teacher_model=teacher, args=config,
                                       train_dataset=to_dataset(data), processing_class=tok,
                                       peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "opd")
    trainer.train(resume_from_checkpoint=resume)
    after = measure(trainer.model, teacher, tok, held, args, ctx.seed)
    gain = lambda k: (before[k] - after[k]) / max(1e-9, (before[f"{k}_se"] ** 2 + after[f"{k}_se"] ** 2) ** 0.5)  # noqa: E731
    metrics = {"stage": "opd", "teacher": str(teacher_dir), "lmbda": args.lmbda, "beta": args.beta,
               "kl_to_teacher_before": before["kl"], "kl_to_teacher": after["kl"],
               "kl_to_teacher_se_before": before["kl_se"], "kl_to_teacher_se": after["kl_se"],
               "kl_drop_in_se": gain("kl"), "eval_loss_before": before["loss"], "eval_loss": after["loss"],
               "eval_loss_se_before": before["loss_se"], "eval_loss_se": after["loss_se"],
               "loss_drop_in_se": gain("loss"), "teacher_eval_loss": teacher_loss[0],
               "train_prompts": len(rows), "eval_prompts": len(held), "eval_n": len(held),
               "steps": trainer.state.global_step, "resumed_from": resume, "data": data_stats,
               "history": train_history(trainer)}
    if args.baseline:
        base = _baseline(ctx, args, model_dir, teacher, rows, held)
        metrics.update(baseline_sft_kl_to_teacher=base["kl"], baseline_sft_kl_to_teacher_se=base["kl_se"],
                       baseline_sft_eval_loss=base["loss"], baseline_sft_eval_loss_se=base["loss_se"])
    return save_stage(trainer.model, tok, ctx, "opd", metrics, args, str(model_dir), "On-policy distilled model",
                      f"On-policy distillation from {teacher_dir} with TRL's GKDTrainer (lmbda {args.lmbda}, "
                      f"beta {args.beta}): the teacher scores the student's own samples.")
