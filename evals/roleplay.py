"""Roleplay: persona consistency on held-out role-play prompts, as a pairwise win rate against a baseline.

Data: GPTeacher roleplay rows ``{"instruction", "input", "output"}`` (a JSONL file or a dir of them; the demo
world's ``sft/roleplay_eval.jsonl``), or chats ``{"messages": [..., assistant reply]}`` such as the SFT rows that
``minitron align`` held out (``OUT/data/sft_heldout.jsonl``). The user turn is the instruction, then the input after a blank line (as
the SFT data). The evaluated model replies greedily; the baseline is another model's greedy reply (the first
model of the run, e.g. the teacher) or the data set's reference ``output``.

Judges:

- ``endpoint``: a judge model behind an OpenAI-compatible endpoint reads ``evals/prompts/judge_roleplay_v1.txt``
  with the two replies in both orders (A/B then B/A, to cancel position bias) and ends with ``[[A]]``, ``[[B]]``
  or ``[[C]]`` (tie). An item scores 1 for a win, 0.5 for a tie, 0 for a loss, averaged over the two orders.
  ``position_consistency`` is the share of items where both orders agree.
- ``reward_model``: the trained reward model (an ``AutoModelForSequenceClassification`` dir, e.g.
  ``runs/demo/aligned/rm``) scores both whole conversations; the higher reward wins (a scalar score has no
  position bias, so both orders give the same verdict). Used offline, when no judge endpoint is given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from evals.generate import EvalError, Generator
from evals.jsonl import read_rows
from evals.results import mean_metric

PROMPT_VERSION = "judge_roleplay_v1"
PROMPT_FILE = Path(__file__).with_name("prompts") / f"{PROMPT_VERSION}.txt"
SCHEMAS = {"GPTeacher": ("instruction", "output"), "chat": ("messages",)}
VERDICT_RE = re.compile(r"\[\[([ABC])\]\]")


def load_prompts(data: str | Path, limit: int | None) -> list[dict[str, Any]]:
    """GPTeacher rows as ``{"id", "messages", "reference"}``, ``limit`` evenly spaced ones."""
    from evals.rag import spread

    p = Path(data)
    files = [p] if p.is_file() else sorted(p.glob("*.jsonl"))
    if not files:
        raise EvalError(f"no roleplay data at {p}: pass a GPTeacher roleplay JSONL (instruction, input, output)")
    rows = []
    for f in files:
        for i, r in enumerate(read_rows(f, SCHEMAS)):
            if "messages" in r:
                # a held-out chat (e.g. minitron align's data/sft_heldout.jsonl): the last reply is the reference
                msgs = r["messages"]
                if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"):
                    raise EvalError(f"{f}: row {i + 1}: 'messages' must end with the assistant's reply (the reference)")
                rows.append({"id": f"{f.stem}/{i}", "messages": msgs[:-1], "reference": msgs[-1]["content"]})
                continue
            user = r["instruction"].strip()
            if str(r.get("input") or "").strip():
                user += "\n\n" + r["input"].strip()
            rows.append({"id": f"{f.stem}/{i}", "messages": [{"role": "user", "content": user}],
                         "reference": r["output"]})
    return spread(rows, limit)


def judge_prompt(instruction: str, a: str, b: str) -> str:
    """The versioned judge prompt filled in (plain replacement: replies may contain braces)."""
    text = PROMPT_FILE.read_text()
    return text.replace("{instruction}", instruction).replace("{response_a}", a).replace("{response_b}", b)


def parse_verdict(text: str) -> str | None:
    """The last ``[[A]]``/``[[B]]``/``[[C]]`` in the judge's reply (None when there is none)."""
    found = VERDICT_RE.findall(text)
    return found[-1] if found else None


def judge_with_endpoint(judge: Generator, items: list[dict], max_new_tokens: int = 256) -> list[dict[str, Any]]:
    """Both orders per item: candidate as A then as B. Adds ``score``, ``verdicts`` and ``consistent``."""
    convs = []
    for it in items:
        q = it["messages"][-1]["content"]
        convs.append({"messages": [{"role": "user", "content": judge_prompt(q, it["response"], it["baseline"])}]})
        convs.append({"messages": [{"role": "user", "content": judge_prompt(q, it["baseline"], it["response"])}]})
    replies = judge.chat(convs, max_new_tokens=max_new_tokens, desc="roleplay judge")
    out = []
    for k, it in enumerate(items):
        v1, v2 = parse_verdict(replies[2 * k]), parse_verdict(replies[2 * k + 1])
        s1 = {"A": 1.0, "B": 0.0, "C": 0.5}.get(v1 or "C")  # unparsable verdicts count as ties
        s2 = {"B": 1.0, "A": 0.0, "C": 0.5}.get(v2 or "C")
        out.append({**it, "verdicts": [v1, v2], "score": (s1 + s2) / 2, "consistent": s1 == s2})
    return out


def judge_with_reward_model(rm_dir: str | Path, items: list[dict]) -> list[dict[str, Any]]:
    """Reward of each whole conversation (candidate vs baseline reply); the higher one wins."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minitron.scoring import reward_scores

    if not Path(rm_dir, "config.json").exists():
        raise EvalError(f"{rm_dir} is not a reward model directory (AutoModelForSequenceClassification)")
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = tok.pad_token_id
    conv = lambda it, reply: it["messages"] + [{"role": "assistant", "content": reply}]  # noqa: E731
    cand = reward_scores(rm, tok, [conv(it, it["response"]) for it in items]).tolist()
    base = reward_scores(rm, tok, [conv(it, it["baseline"]) for it in items]).tolist()
    return [{**it, "reward": c, "baseline_reward": b, "score": 1.0 if c > b + 1e-6 else 0.0 if c < b - 1e-6 else 0.5}
            for it, c, b in zip(items, cand, base)]


def evaluate(gen: Generator, data: str | Path, limit: int | None, baseline: Generator | str = "reference",
             judge: Generator | None = None, judge_model: str | Path | None = None,
             max_new_tokens: int = 128) -> dict[str, Any]:
    """Win rate of ``gen`` against ``baseline`` (a Generator or ``"reference"``), by ``judge`` or ``judge_model``."""
    if judge is None and judge_model is None:
        raise EvalError("roleplay needs a judge: --judge-endpoint URL or --judge-model REWARD_MODEL_DIR")
    items = load_prompts(data, limit)
    convs = [{"messages": it["messages"]} for it in items]
    replies = gen.chat(convs, max_new_tokens=max_new_tokens, desc="roleplay")
    if isinstance(baseline, Generator):
        base, base_name = baseline.chat(convs, max_new_tokens=max_new_tokens, desc="roleplay baseline"), baseline.name
    else:
        base, base_name = [it["reference"] for it in items], "reference"
    items = [{**it, "response": r, "baseline": b} for it, r, b in zip(items, replies, base)]
    if judge is not None:
        items = judge_with_endpoint(judge, items)
        metrics = {"win_rate": mean_metric([it["score"] for it in items]),
                   "position_consistency": mean_metric([float(it["consistent"]) for it in items])}
        how = f"judge {judge.name} ({PROMPT_VERSION}, both orders)"
    else:
        items = judge_with_reward_model(judge_model, items)
        metrics = {"win_rate": mean_metric([it["score"] for it in items]),
                   "reward_margin": mean_metric([it["reward"] - it["baseline_reward"] for it in items], raw=True)}
        how = f"reward model {judge_model}"
    return {"metrics": metrics, "items": items, "note": f"win rate vs {base_name}, judged by {how}"}
