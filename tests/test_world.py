"""The demo world: deterministic, in the real formats, with disjoint train and eval splits."""

import json

import pytest

from minitron.config import ConfigError
from minitron.data import read_jsonl
from minitron.world import IF_SPECS, WorldConfig, _checker, build, ensure_world

SMALL = dict(n_entities=30, n_rag_entities=8, corpus_repeats=2, n_mc_test=40, n_ifeval=14, n_rag=9, n_bfcl=4,
             n_sft=40, n_errands=20, n_preference=30, n_roleplay_eval=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(WorldConfig(out=str(tmp_path_factory.mktemp("w") / "world"), **SMALL))


def test_deterministic():
    a, b = build(WorldConfig(**SMALL)), build(WorldConfig(**SMALL))
    assert a == b
    assert build(WorldConfig(seed=1, **SMALL))["mmlu/mmlu_test.jsonl"] != a["mmlu/mmlu_test.jsonl"]


def test_formats_match_the_real_data_sets(world):
    mc = list(read_jsonl(world / "mmlu" / "mmlu_test.jsonl"))
    assert all(set(r) == {"question", "choices", "answer", "subject"} and len(r["choices"]) == 4 for r in mc)
    cats = json.loads((world / "mmlu" / "subject_categories.json").read_text())
    assert {r["subject"] for r in mc} <= set(cats)
    ife = list(read_jsonl(world / "ifeval" / "input_data.jsonl"))
    assert all(set(r) == {"key", "prompt", "instruction_id_list", "kwargs"} for r in ife)
    rag = list(read_jsonl(world / "rag" / "rag_eval.jsonl"))
    for r in rag:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start : start + len(text)] == text
    assert any(r["is_impossible"] for r in rag) and not all(r["is_impossible"] for r in rag)
    for cat in ["simple_python", "multiple", "parallel", "parallel_multiple"]:
        qs = list(read_jsonl(world / "bfcl" / f"BFCL_v4_{cat}.json"))
        ans = list(read_jsonl(world / "bfcl" / "possible_answer" / f"BFCL_v4_{cat}.json"))
        assert [q["id"] for q in qs] == [a["id"] for a in ans]
        for q, a in zip(qs, ans):
            offered = {f["name"] for f in q["function"]}
            assert {next(iter(c)) for c in a["ground_truth"]} <= offered
    sft = list(read_jsonl(world / "sft" / "train.jsonl"))
    assert any("tools" in r for r in sft) and all(r["messages"][-1]["role"] == "assistant" for r in sft)


def test_sft_tools_are_offered_as_the_function_calling_eval_offers_them(world):
    """One tool format for training and evaluation: the world's SFT schemas are the BFCL eval's rendering."""
    from minitron.tool_schema import to_openai_tools
    from minitron.world import FUNCTIONS

    sft = [r for r in read_jsonl(world / "sft" / "train.jsonl") if "tools" in r]
    calls = [r for r in sft if r["messages"][-1].get("tool_calls")]
    assert calls and len(calls) < len(sft)  # tool calls, and answers in text when no offered tool fits
    for r in sft:
        names = [t["function"]["name"] for t in r["tools"]]
        assert r["tools"] == to_openai_tools([FUNCTIONS[n] for n in names], "simple_python")
    for r in calls:
        offered = {t["function"]["name"] for t in r["tools"]}
        assert {c["function"]["name"] for c in r["messages"][-1]["tool_calls"]} <= offered


def test_splits_do_not_overlap(world):
    test_q = {r["question"] for r in read_jsonl(world / "mmlu" / "mmlu_test.jsonl")}
    dev_q = {r["question"] + str(r["choices"]) for r in read_jsonl(world / "mmlu" / "mmlu_dev.jsonl")}
    practice = " ".join(r["text"] for r in read_jsonl(world / "corpus" / "train.jsonl") if "Answer:" in r["text"])
    assert not any(q in practice for q in test_q)
    assert not (test_q & {d.split("[")[0] for d in dev_q})
    eval_prompts = {r["prompt"] for r in read_jsonl(world / "ifeval" / "input_data.jsonl")}
    # roleplay pairs carry a system persona as a message list: compare the user's text
    train_prompts = {r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
                     for r in read_jsonl(world / "preference" / "train.jsonl")}
    roleplay_eval = {r["instruction"] for r in read_jsonl(world / "sft" / "roleplay_eval.jsonl")}
    assert not roleplay_eval & train_prompts
    assert not eval_prompts & train_prompts


def test_train_data_never_contains_an_eval_request():
    """Tool calls are random draws from one small space: without decontamination SFT rows repeat eval requests
    word for word (the demo's 2,400 SFT rows once held 258 calls equal to an eval call)."""
    cfg = dict(SMALL, n_bfcl=30, n_sft=600, n_errands=600)  # dense enough that chance repeats would happen
    out = build(WorldConfig(**cfg))
    held_out = set()
    for path, rows in out.items():
        if path.startswith("bfcl/BFCL_v4_"):
            for q in rows:
                text = q["question"][0][0]["content"]
                if text.startswith("Please "):
                    held_out.update(text[len("Please "):-1].split(" and "))
    assert len(held_out) > 100
    requests = [m["content"] for r in out["sft/train.jsonl"] + out["sft/validation.jsonl"] if "tools" in r
                for m in r["messages"] if m["role"] == "user" and m["content"].startswith("Please ")]
    errands = [d["text"] for d in out["corpus/train.jsonl"] + out["corpus/validation.jsonl"]
               if d["text"].startswith("Request: ")]
    assert len(requests) > 100 and len(errands) == 600
    for text in requests + errands:
        request = text.split("Please ", 1)[1].split(". Log:")[0].rstrip(".")
        assert not set(request.split(" and ")) & held_out, text


def test_errand_logs_copy_their_request(world):
    """Corpus errands: every string argument of the log is in the request (learnable only by copying)."""
    import re

    errands = [r["text"] for r in read_jsonl(world / "corpus" / "train.jsonl") if r["text"].startswith("Request: ")]
    assert errands
    for text in errands:
        request, log = text.split(" Log: ")
        for value in re.findall(r"=([A-Za-z]+)", log):
            assert value in request, text


def test_preferences_verified_by_lm_eval_checkers(world):
    by_text = {spec[2]: spec[0] for spec in IF_SPECS}
    rows = list(read_jsonl(world / "preference" / "train.jsonl"))
    roleplay = [r for r in rows if "Stay in character." in json.dumps(r["prompt"])]
    assert roleplay and all(r["chosen"] != r["rejected"] for r in roleplay)
    for r in rows:
        if r in roleplay:
            continue
        iid = next(i for t, i in by_text.items() if r["prompt"].endswith(t))
        kwargs = next(s[1](None) for s in IF_SPECS if s[0] == iid)
        check = _checker(iid, kwargs)
        assert check(r["chosen"]) and not check(r["rejected"])


def test_rag_entities_absent_from_corpus(world):
    corpus = " ".join(r["text"] for r in read_jsonl(world / "corpus" / "train.jsonl"))
    for r in read_jsonl(world / "rag" / "rag_eval.jsonl"):
        assert r["title"] not in corpus


def test_bad_config_fails_early():
    with pytest.raises(ConfigError, match="n_entities must be >= 20"):
        WorldConfig(n_entities=3)
