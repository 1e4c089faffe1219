"""RAG: retrieve top-k passages, answer from them in the chat prompt, score like SQuAD.

Data (a file, or a dir whose ``*.jsonl``/``*.jsonl.gz`` files are each one data set with its own corpus):

- SQuAD 2.0 rows ``{"id", "title", "context", "question", "answers": {"text": [...]}, "is_impossible"}``: the
  corpus is the distinct ``context`` paragraphs, the gold passage is the row's own paragraph;
- NQ-open rows ``{"question", "answers": [...], "ctxs": [{"title", "text", "isgold"}]}``: the corpus is every
  row's passages pooled (deduplicated), the gold passage is the one marked ``isgold``.

Retrieval is BM25 (``bm25s``) by default, or dense (mean-pooled hidden states of an HF encoder, cosine; the
evaluated model's own by default). The top-k passages and the question go into the chat template; the model
answers with a short span, or ``unanswerable``. Answer quality: SQuAD's EM and F1 with its normalisation
(lower case, no punctuation or articles, single spaces) over all questions, with an abstention counted as the
empty answer (right on unanswerable questions, as in SQuAD 2.0's official script); plus the split into
``has_ans_*`` and ``no_ans_acc``. Retrieval quality is reported apart: ``recall_at_k`` (gold passage among the
top k, answerable questions only) and ``recall_at_1``.
"""

from __future__ import annotations

import collections
import re
import string
from pathlib import Path
from typing import Any

from evals.generate import EvalError, Generator
from evals.jsonl import read_rows
from evals.results import mean_metric
from minitron.retrieval import bm25_retrieve, rag_messages, rows_to_items

PUNCT = set(string.punctuation)
SCHEMAS = {"SQuAD 2.0": ("context", "question", "answers"), "NQ-open": ("question", "answers", "ctxs")}
ABSTAIN = ("unanswerable", "no answer", "cannot be answered", "not in the passages", "i don't know", "unknown")


# ---------- SQuAD scoring (the official v2.0 evaluation script's normalisation) ----------
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_score(pred: str, gold: str) -> float:
    """Token-overlap F1; when either side is empty (no answer), 1.0 only if both are."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def is_abstention(text: str) -> bool:
    """An empty reply or one that says the passages hold no answer."""
    t = text.strip().lower()
    return not normalize_answer(t) or any(a in t for a in ABSTAIN)


# ---------- data ----------
def load_sets(data: str | Path) -> list[tuple[str, list[dict], list[str]]]:
    """[(name, questions, corpus)] for a data file or every JSONL file of a data dir."""
    p = Path(data)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise EvalError(f"no RAG data at {p}: pass a SQuAD 2.0 or NQ-open JSONL file (or a dir of them)")
    sets = []
    for f in files:
        name = f.name.split(".")[0]
        items, corpus = rows_to_items(read_rows(f, SCHEMAS), name)
        sets.append((name, items, corpus))
    return sets


def spread(items: list[Any], limit: int | None) -> list[Any]:
    """``limit`` items evenly spaced over the list (covers every article rather than the first one)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


# ---------- retrieval ----------
def dense_retrieve(corpus: list[str], queries: list[str], k: int, model_dir: str | Path,
                   batch_size: int = 32) -> list[list[int]]:
    """Top-k by cosine similarity of mean-pooled last hidden states of the encoder at ``model_dir``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b : b + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    sims = embed(queries) @ embed(corpus).T
    return sims.topk(min(k, len(corpus)), dim=-1).indices.tolist()


# ---------- the task ----------
def build_prompt(question: str, passages: list[str]) -> dict[str, Any]:
    """The chat conversation: instructions, numbered passages, then the question (``minitron.chat_format``)."""
    return {"messages": rag_messages(question, passages)}


def score_item(item: dict[str, Any], prediction: str) -> dict[str, Any]:
    """EM/F1 against the gold answers ("" for unanswerable), abstention flags."""
    abstained = is_abstention(prediction)
    pred = "" if abstained else prediction.strip().split("\n")[0]
    golds = item["answers"] if not item["is_impossible"] and item["answers"] else [""]
    return {**item, "prediction": prediction, "abstained": abstained,
            "em": max(exact_match(pred, g) for g in golds), "f1": max(f1_score(pred, g) for g in golds)}


def evaluate(gen: Generator, data_dir: str | Path, limit: int | None, top_k: int = 3, retriever: str = "bm25",
             dense_model: str | None = None, max_new_tokens: int = 32) -> dict[str, Any]:
    """Retrieve, generate, score; ``limit`` caps questions per data set. Returns metrics and per-item records."""
    items: list[dict[str, Any]] = []
    for name, questions, corpus in load_sets(data_dir):
        questions = spread(questions, limit)
        queries = [q["question"] for q in questions]
        if retriever == "bm25":
            top = bm25_retrieve(corpus, queries, top_k)
        elif retriever == "dense":
            model_dir = dense_model or getattr(gen.backend, "path", None)
            if model_dir is None:
                raise EvalError("dense retrieval needs --rag-dense-model DIR (an HF encoder) with --endpoint")
            top = dense_retrieve(corpus, queries, top_k, model_dir)
        else:
            raise EvalError(f"unknown retriever {retriever!r}: use bm25 or dense")
        convs = [build_prompt(q["question"], [corpus[j] for j in t]) for q, t in zip(questions, top)]
        preds = gen.chat(convs, max_new_tokens=max_new_tokens, desc=f"rag {name}")
        for q, t, p in zip(questions, top, preds):
            items.append({**score_item(q, p), "retrieved": t, "gold_rank": t.index(q["gold"]) + 1 if q["gold"] in t else None})
    return {"metrics": rag_metrics(items), "items": items}


def rag_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer quality (em, f1, has_ans_*, no_ans_acc) and retrieval recall, each with n and stderr."""
    has = [i for i in items if not i["is_impossible"]]
    no = [i for i in items if i["is_impossible"]]
    with_gold = [i for i in has if i["gold"] is not None]
    metrics = {"em": mean_metric([i["em"] for i in items]), "f1": mean_metric([i["f1"] for i in items]),
               "has_ans_em": mean_metric([i["em"] for i in has]), "has_ans_f1": mean_metric([i["f1"] for i in has]),
               "recall_at_k": mean_metric([float(i["gold_rank"] is not None) for i in with_gold]),
               "recall_at_1": mean_metric([float(i["gold_rank"] == 1) for i in with_gold])}
    if no:
        metrics["no_ans_acc"] = mean_metric([float(i["abstained"]) for i in no])
    if has:
        metrics["false_abstain_rate"] = mean_metric([float(i["abstained"]) for i in has])
    return metrics
