"""IFEval offline: the project's punkt_tab, lm-eval's checkers on known replies, and the task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals import ifeval
from evals.generate import Generator, HFBackend

ROWS = [
    {"key": 1, "prompt": "Describe a fox. Do not use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Answer in fewer than 3 sentences: where is Oslo?",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"num_sentences": 3, "relation": "less than"}]},
    {"key": 3, "prompt": "Write about bread in all lowercase letters, and end with 'any other questions?'.",
     "instruction_id_list": ["change_case:english_lowercase", "startend:end_checker"],
     "kwargs": [{}, {"end_phrase": "any other questions?"}]},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ifeval")
    (folder / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


@pytest.fixture(scope="module")
def punkt(tmp_path_factory, data):
    """A punkt_tab trained here (small text budget), found through NLTK_DATA."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINITRON_CACHE", str(tmp_path_factory.mktemp("minitron_cache")))
    root = ifeval.ensure_punkt(data / "input_data.jsonl", max_chars=300_000)
    yield root
    mp.undo()


def test_punkt_tab_is_trained_and_found(punkt):
    import nltk

    from conftest import shared_data

    shared_data("lm", "gutenberg")  # "Mr." is learnt from Gutenberg; the IFEval-prompt fallback never shows it
    found = Path(str(nltk.data.find("tokenizers/punkt_tab/english/")))  # ours, or one installed beforehand
    files = sorted(p.name for p in found.iterdir())
    assert files == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    assert nltk.sent_tokenize("Mr. Smith went to Oslo. He saw a fox! Did it run? Yes.") == [
        "Mr. Smith went to Oslo.", "He saw a fox!", "Did it run?", "Yes."]


def test_lm_eval_checkers_on_known_replies(punkt):
    """lm-eval's own process_results (sentence counting uses punkt) accepts good replies and rejects bad ones."""
    from lm_eval.tasks.ifeval.utils import process_results

    good = ["A quick red fox runs.", "Oslo is in Norway. It is cold.", "bread is warm. any other questions?"]
    bad = ["A red, quick fox.", "Oslo. Is. In. Norway.", "Bread is warm."]
    for row, g, b in zip(ROWS, good, bad):
        assert process_results(row, [g])["prompt_level_strict_acc"] is True
        assert process_results(row, [b])["prompt_level_strict_acc"] is False


def test_ifeval_end_to_end(punkt, data, tiny_model_dir, tmp_path):
    """Prompts through the chat template: each response is the model's greedy chat reply to its prompt, each item
    is scored by lm-eval's checker, and the metrics (n = prompts or instructions) average those scores."""
    from lm_eval.tasks.ifeval.utils import process_results

    gen = Generator(HFBackend(tiny_model_dir), None)
    res = ifeval.evaluate(gen, data, None, tmp_path, max_new_tokens=16)
    items, m = res["items"], res["metrics"]
    assert [i["id"] for i in items] == [1, 2, 3]
    replies = gen.chat([{"messages": [{"role": "user", "content": r["prompt"]}]} for r in ROWS], max_new_tokens=16)
    assert [i["response"] for i in items] == replies and all(replies)
    for row, item in zip(ROWS, items):
        assert process_results(row, [item["response"]])["prompt_level_strict_acc"] == item["prompt_level_strict_acc"]
    assert set(m) == set(ifeval.METRICS)
    assert m["prompt_level_strict_acc"]["n"] == 3 and m["inst_level_strict_acc"]["n"] == 4
    assert m["prompt_level_strict_acc"]["value"] == pytest.approx(sum(i["prompt_level_strict_acc"] for i in items) / 3)
    assert "3/3 replies hit max_new_tokens=16" in res["note"]  # a random model never ends its reply
