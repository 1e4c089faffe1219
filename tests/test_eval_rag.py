"""RAG: SQuAD scoring and normalisation, both data formats, retrieval recall, abstention, end to end."""

from __future__ import annotations

import gzip
import json

import pytest

from evals import rag
from evals.generate import EvalError, Generator, HFBackend
from minitron.data import DataError
from conftest import shared_data

PEOPLE = [("Mirel", "Paris", "red"), ("Quen", "Lima", "fox"), ("Atha", "Oslo", "bread"), ("Borin", "Tokyo", "soup")]


def write_squad(path) -> None:
    """SQuAD 2.0 rows: two questions per person's paragraph, the second unanswerable."""
    rows = []
    for i, (n, c, v) in enumerate(PEOPLE):
        ctx = f"{n} lives in {c}. The favourite thing of {n} is {v}."
        rows.append({"id": f"a{i}", "title": n, "context": ctx, "question": f"In which city does {n} live?",
                     "answers": {"text": [c], "answer_start": [ctx.find(c)]}, "is_impossible": False})
        rows.append({"id": f"u{i}", "title": n, "context": ctx, "question": f"What job does {n} have?",
                     "answers": {"text": [], "answer_start": []}, "is_impossible": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_nq(path) -> None:
    """NQ-open rows with one gold passage each (gzipped, like the shared copy)."""
    rows = [{"question": f"where does {n} live", "answers": [c],
             "ctxs": [{"title": n, "text": f"{n} moved to {c} long ago.", "hasanswer": True, "isgold": True}]}
            for n, c, _ in PEOPLE]
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag")
    write_squad(folder / "squad.jsonl")
    write_nq(folder / "nq.jsonl.gz")
    return folder


def test_squad_normalisation_and_scores():
    assert rag.normalize_answer("The  Big, red fox!") == "big red fox"
    assert rag.exact_match("the Normans", "Normans") == 1.0
    assert rag.f1_score("in the north of France", "north France") == pytest.approx(2 / 3)  # P 2/4, R 2/2
    assert rag.f1_score("", "") == 1.0 and rag.f1_score("x", "") == 0.0 and rag.f1_score("a", "b") == 0.0


def test_abstention_scoring():
    """'unanswerable' on an impossible question is right (EM 1); on an answerable one it is a miss."""
    impossible = {"answers": [], "is_impossible": True}
    answerable = {"answers": ["Paris"], "is_impossible": False}
    assert rag.score_item(impossible, "Unanswerable.")["em"] == 1.0
    assert rag.score_item(impossible, "Paris")["em"] == 0.0
    assert rag.score_item(answerable, "unanswerable")["f1"] == 0.0
    assert rag.score_item(answerable, "the city of Paris\nmore text")["f1"] == pytest.approx(0.5)  # first line


def test_loaders_read_both_formats(data):
    sets = {name: (items, corpus) for name, items, corpus in rag.load_sets(data)}
    items, corpus = sets["squad"]
    assert len(items) == 8 and len(corpus) == 4  # distinct paragraphs
    assert sum(i["is_impossible"] for i in items) == 4 and items[0]["answers"] == ["Paris"]
    assert all(PEOPLE[k // 2][0] in corpus[i["gold"]] for k, i in enumerate(items))
    items, corpus = sets["nq"]
    assert len(items) == 4 and not any(i["is_impossible"] for i in items)
    assert [corpus[i["gold"]].split("\n")[0] for i in items] == [p[0] for p in PEOPLE]


def test_bm25_finds_the_gold_passage(data):
    _, items, corpus = rag.load_sets(data / "squad.jsonl")[0]
    top = rag.bm25_retrieve(corpus, [i["question"] for i in items], 2)
    assert all(t[0] == i["gold"] for t, i in zip(top, items))


def test_end_to_end_metrics(data, tiny_model_dir):
    """Both retrievers; answer quality and retrieval recall reported apart, with n per metric."""
    gen = Generator(HFBackend(tiny_model_dir), None)
    for retriever in ("bm25", "dense"):
        res = rag.evaluate(gen, data, None, top_k=2, retriever=retriever, max_new_tokens=8)
        m = res["metrics"]
        assert m["em"]["n"] == m["f1"]["n"] == 12 and m["no_ans_acc"]["n"] == 4 and m["has_ans_f1"]["n"] == 8
        assert m["recall_at_k"]["n"] == 8 and 0 <= m["recall_at_1"]["value"] <= m["recall_at_k"]["value"] <= 1
        assert all(len(i["retrieved"]) == 2 for i in res["items"])
        if retriever == "bm25":  # every question names its person: BM25 ranks the gold passage first
            assert m["recall_at_1"]["value"] == 1.0
    assert m["recall_at_k"]["value"] > 0  # the dense path really ranks (gold among top 2 of 4 somewhere)


def test_limit_spreads_and_errors(tmp_path):
    assert rag.spread(list(range(10)), 3) == [0, 3, 6]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing 'context', 'answers'; expected a row of SQuAD 2\.0"):
        rag.load_sets(tmp_path / "bad.jsonl")
    with pytest.raises(EvalError, match="no RAG data"):
        rag.load_sets(tmp_path / "nothing")


def test_shared_data_loads():
    """The real SQuAD 2.0 and NQ-open files: every question has its gold passage in the corpus."""
    for name, items, corpus in rag.load_sets(shared_data("rag")):
        assert items and all(i["gold"] is not None and i["gold"] < len(corpus) for i in items)
        if name.startswith("squad"):
            assert len(corpus) == 646 and sum(i["is_impossible"] for i in items) == 3168
