"""Retrieval-augmented QA pieces shared by the RAG eval (``evals.rag``) and the SFT mix (``align.sft_mix``).

- ``rows_to_items``: SQuAD 2.0 or NQ-open rows as questions (with the index of their gold passage) and a corpus;
- ``bm25_retrieve``: top-k passages per question with ``bm25s``;
- ``rag_messages``: the chat prompt (instructions, numbered passages, question) that the model answers.
"""

from __future__ import annotations

from typing import Any

from minitron.data import DataError

RAG_SYSTEM = ("Answer the question with a short phrase taken from the passages. If the passages do not contain "
              "the answer, reply exactly: unanswerable")
ABSTAIN_REPLY = "unanswerable"


def rag_messages(question: str, passages: list[str]) -> list[dict[str, str]]:
    """The conversation: instructions, numbered passages, then the question."""
    ctx = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    return [{"role": "system", "content": RAG_SYSTEM},
            {"role": "user", "content": f"Passages:\n{ctx}\n\nQuestion: {question}"}]


def rows_to_items(rows: list[dict[str, Any]], source: str) -> tuple[list[dict], list[str]]:
    """(questions, corpus) from SQuAD 2.0 or NQ-open rows; each question keeps the index of its gold passage."""
    corpus: dict[str, int] = {}

    def add(title: str, text: str) -> int:
        return corpus.setdefault(f"{title}\n{text}" if title else text, len(corpus))

    items = []
    for i, r in enumerate(rows):
        if "context" in r:  # SQuAD 2.0
            gold = add(r.get("title", "").replace("_", " "), r["context"])
            answers = list(r["answers"]["text"]) if isinstance(r["answers"], dict) else list(r["answers"])
            impossible = bool(r.get("is_impossible", not answers))
        elif "ctxs" in r:  # NQ-open with passages
            golds = [add(c.get("title", ""), c["text"]) for c in r["ctxs"] if c.get("isgold")]
            for c in r["ctxs"]:
                add(c.get("title", ""), c["text"])
            gold, answers, impossible = (golds[0] if golds else None), list(r["answers"]), False
        else:
            raise DataError(f"{source}: row {i} is neither SQuAD 2.0 (context, answers) nor NQ-open (ctxs, answers)")
        items.append({"id": str(r.get("id", i)), "source": source, "question": r["question"], "answers": answers,
                      "is_impossible": impossible, "gold": gold})
    return items, list(corpus)


def bm25_retrieve(corpus: list[str], queries: list[str], k: int) -> list[list[int]]:
    """Top-k passage indices per query with BM25 (English stop words removed)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    docs, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                 k=min(k, len(corpus)), show_progress=False)
    return docs.tolist()
