"""The SFT training mix: the data's own examples, plus three optional kinds built from held-in data.

- **teacher answers** (Minitron's "student trained on the teacher's inputs and responses", SGD-style distillation):
  a ``teacher_share`` of the single-turn training examples get the teacher's greedy answer instead of the data's.
  Answers cut at ``teacher_max_new_tokens`` are not used (the example keeps its reference answer). Generation is
  cached per prompt in ``OUT/.work/teacher_answers/<teacher and decoding>.jsonl``, beside the SFT stage's work: an
  interrupted run does not redo it, and neither does an SFT redone for another setting (another lr, more steps).
- **retrieval-augmented QA**: ``rag_examples`` questions of ``rag_data`` (NQ-open or SQuAD 2.0 rows) with their
  top-k BM25 passages in the prompt of the RAG eval; the answer is the gold answer when the gold passage was
  retrieved, else ``unanswerable`` (as SQuAD 2.0 scores abstentions).
- **verifiable format constraints** (``align.constraints``): a ``constraint_share`` of the single-turn examples
  get IFEval-type instructions appended and their answers rewritten to obey them, checked by lm-eval's checkers.
- **tools not to call**: ``tool_distractors`` single-turn examples get the tool schemas of a random tool-use example
  and keep their plain-text answer. Without them every training example that shows tools calls one, and the model
  learns to call whatever it is given (BFCL's irrelevance questions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from align import data as D
from align.constraints import constrain
from minitron.config import ConfigError, arg


@dataclasses.dataclass
class SFTMixArgs:
    """What joins the SFT data (``--sft-mix.teacher DIR --sft-mix.teacher-share 0.3``)."""

    teacher: str | None = arg(None, "model whose greedy answers replace teacher_share of the answers (None: off)")
    teacher_share: float = arg(0.0, "share of single-turn training examples answered by the teacher")
    teacher_max_new_tokens: int = arg(256, "cap on a teacher answer (answers that hit it are not used)")
    teacher_batch_size: int = arg(16, "prompts per generation batch")
    teacher_dtype: str = arg("bfloat16", "teacher weights for generation: bfloat16 (fast on AMX CPUs) or float32")
    rag_data: list[str] = arg([], "NQ-open / SQuAD 2.0 files for retrieval-augmented QA examples")
    rag_examples: int = arg(0, "retrieval-augmented QA examples to add")
    rag_top_k: int = arg(3, "passages per RAG prompt (the RAG eval's top_k)")
    constraint_share: float = arg(0.0, "share of single-turn examples given verifiable format constraints")
    max_constraints: int = arg(2, "constraints per augmented example (1..max)")
    tool_distractors: int = arg(0, "single-turn examples shown a random tool-use example's tools, still answered "
                                   "in text (practice in not calling a tool the question does not need)")

    def __post_init__(self):
        if not (0 <= self.teacher_share <= 1 and 0 <= self.constraint_share <= 1):
            raise ConfigError("sft_mix.teacher_share and sft_mix.constraint_share must be in [0, 1]")
        if self.teacher_share > 0 and not self.teacher:
            raise ConfigError("sft_mix.teacher_share > 0 needs sft_mix.teacher (a model dir, .gguf or hub name)")
        if self.teacher_dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"sft_mix.teacher_dtype must be bfloat16 or float32 (got {self.teacher_dtype!r})")
        if self.rag_examples > 0 and not self.rag_data:
            raise ConfigError("sft_mix.rag_examples > 0 needs sft_mix.rag_data (NQ-open or SQuAD 2.0 files)")


def single_turn(ex: dict[str, Any]) -> bool:
    """A user question (after an optional system line) answered in plain text: what the mix may rewrite."""
    roles = [m["role"] for m in ex["prompt"]]
    return (roles[-1:] == ["user"] and set(roles[:-1]) <= {"system"} and not ex.get("tools")
            and not ex["completion"][0].get("tool_calls"))


def _key(prompt: list[dict]) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def answer_cache(work: Path, args: SFTMixArgs) -> Path:
    """Where the teacher's answers are cached: one file per teacher (its fingerprint when it is a local path) and
    decoding settings, in the folder above the SFT stage's work dir, which a redone SFT moves aside."""
    from minitron.fingerprint import of_path

    teacher = of_path(args.teacher) if args.teacher and Path(args.teacher).exists() else args.teacher
    tag = json.dumps([teacher, args.teacher_max_new_tokens, args.teacher_dtype, args.teacher_batch_size])
    return work.parent / "teacher_answers" / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.jsonl"


def teacher_answers(teacher: str, prompts: list[list[dict]], args: SFTMixArgs, cache: Path) -> dict[str, dict]:
    """``{prompt key: {"text", "stopped"}}``: the teacher's greedy answers, generated once and cached in ``cache``."""
    import torch
    from tqdm import tqdm

    from align.common import load_causal_lm, load_tokenizer
    from align.scoring import sample
    from minitron.model_source import resolve_model

    done = {}
    if cache.exists():
        done = {r["key"]: r for r in map(json.loads, cache.read_text().splitlines()) if r}
    todo = [p for p in prompts if _key(p) not in done]
    if todo:
        path = resolve_model(teacher, "sft_mix.teacher")
        tok = load_tokenizer(path)
        model = load_causal_lm(path, tok, getattr(torch, args.teacher_dtype)).eval()
        tok.padding_side = "left"
        todo.sort(key=lambda p: len(json.dumps(p)))  # similar lengths per batch: less padding
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as f:
            for s in tqdm(range(0, len(todo), args.teacher_batch_size), desc="teacher answers", unit="batch"):
                batch = todo[s:s + args.teacher_batch_size]
                for p, out in zip(batch, sample(model, tok, batch, args.teacher_max_new_tokens, 0, temperature=0.0,
                                                batch_size=len(batch))):
                    row = {"key": _key(p), "text": out["text"], "stopped": out["stopped"]}
                    f.write(json.dumps(row) + "\n")  # one line per answer: a crash loses at most one batch
                    done[row["key"]] = row
                f.flush()
    return done


def rag_examples(sources: list[str], n: int, top_k: int, seed: int) -> list[dict[str, Any]]:
    """``n`` retrieval-augmented QA examples (prompt/completion) from NQ-open or SQuAD 2.0 files."""
    from minitron.retrieval import ABSTAIN_REPLY, bm25_retrieve, rag_messages, rows_to_items

    out = []
    for source in sources:
        rows = [row for _, _, row in D.iter_source(source, "train")]
        items, corpus = rows_to_items(rows, source)
        items = random.Random(seed).sample(items, min(len(items), -(-n // len(sources))))
        top = bm25_retrieve(corpus, [it["question"] for it in items], top_k)
        for it, t in zip(items, top):
            answer = it["answers"][0] if it["answers"] and it["gold"] in t and not it["is_impossible"] else ABSTAIN_REPLY
            out.append({"prompt": rag_messages(it["question"], [corpus[j] for j in t]),
                        "completion": [{"role": "assistant", "content": answer}]})
    return out[:n]


def build(args: SFTMixArgs, rows: list[dict], work: Path, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """The training examples with the teacher's answers, RAG examples and constraints mixed in; and their counts."""
    rng = random.Random(seed)
    rows = [dict(r) for r in rows]
    single = [i for i, r in enumerate(rows) if single_turn(r)]
    stats: dict[str, Any] = {"data_examples": len(rows), "single_turn": len(single)}
    if args.teacher and args.teacher_share > 0:
        chosen = rng.sample(single, min(len(single), round(args.teacher_share * len(rows))))
        answers = teacher_answers(args.teacher, [rows[i]["prompt"] for i in chosen], args, answer_cache(work, args))
        used = 0
        for i in chosen:
            a = answers[_key(rows[i]["prompt"])]
            if a["stopped"] and a["text"].strip():
                rows[i] = {**rows[i], "completion": [{"role": "assistant", "content": a["text"].strip()}]}
                used += 1
        stats.update(teacher_asked=len(chosen), teacher_answers=used, teacher_cut=len(chosen) - used)
    if args.rag_examples:
        added = rag_examples(args.rag_data, args.rag_examples, args.rag_top_k, seed)
        stats["rag_examples"] = len(added)
        stats["rag_unanswerable"] = sum(ex["completion"][0]["content"] == "unanswerable" for ex in added)
        rows += added
    if args.constraint_share > 0:
        made = 0
        for i in rng.sample(single, round(args.constraint_share * len(single))):
            prompt, answer = rows[i]["prompt"], rows[i]["completion"][0]["content"]
            c = constrain(prompt[-1]["content"], answer, rng, args.max_constraints)
            if c is not None:
                rows[i] = {**rows[i], "prompt": prompt[:-1] + [{"role": "user", "content": c["prompt"]}],
                           "completion": [{"role": "assistant", "content": c["answer"]}]}
                made += 1
        stats["constrained"] = made
    schemas = [r["tools"] for r in rows if r.get("tools")] if args.tool_distractors else []
    if schemas:
        for i in rng.sample(single, min(len(single), args.tool_distractors)):
            rows[i] = {**rows[i], "tools": rng.choice(schemas)}
        stats["tool_distractors"] = min(len(single), args.tool_distractors)
    rng.shuffle(rows)
    return rows, stats
