"""Roleplay: GPTeacher prompts, the versioned judge prompt, verdict parsing, and the reward-model judge (a served
judge, asked in both orders: tests/test_serve.py)."""

from __future__ import annotations

import json

import pytest
import torch

from evals import roleplay
from evals.generate import EvalError, Generator, HFBackend

ROWS = [{"instruction": "You are Captain Rook, a pirate. Stay in character. Where does Mirel live?", "input": "",
         "output": "Arr! Mirel lives in Paris."},
        {"instruction": "Imagine you are a robot butler.", "input": "Greet the guests.", "output": "BEEP. Welcome."},
        {"instruction": "You are a wizard. What is your favourite food?", "input": "", "output": "Bread, by magic."}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rp") / "roleplay_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_tokenizer):
    """A tiny random AutoModelForSequenceClassification dir (one logit), like align's RM output."""
    from conftest import tiny_config
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("rm") / "rm"
    rm = AutoModelForSequenceClassification.from_config(tiny_config(vocab_size=len(tiny_tokenizer), num_labels=1))
    rm.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_prompts_and_judge_template(data):
    items = roleplay.load_prompts(data, None)
    assert items[1]["messages"] == [{"role": "user", "content": "Imagine you are a robot butler.\n\nGreet the guests."}]
    assert items[0]["reference"] == "Arr! Mirel lives in Paris."
    text = roleplay.judge_prompt("REQ {x}", "first {reply}", "second")
    assert "REQ {x}" in text and text.index("first {reply}") < text.index("second") and "[[A]]" in text
    assert roleplay.PROMPT_FILE.name == "judge_roleplay_v1.txt"


def test_parse_verdict():
    assert roleplay.parse_verdict("A is vague. B stays in character.\n[[B]]") == "B"
    assert roleplay.parse_verdict("I said [[A]] first, but final: [[C]]") == "C"
    assert roleplay.parse_verdict("no verdict") is None


def test_reward_model_judge_end_to_end(data, reward_model, tiny_model_dir):
    """Win rate of a model against the references: each reply is the model's greedy chat reply, each reward the
    reward model's score of the whole conversation; and against itself (all ties: exactly 0.5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minitron.scoring import reward_scores

    gen = Generator(HFBackend(tiny_model_dir), None)
    res = roleplay.evaluate(gen, data, None, "reference", judge_model=reward_model, max_new_tokens=12)
    items, m = res["items"], res["metrics"]
    assert [i["response"] for i in items] == gen.chat([{"messages": i["messages"]} for i in items], max_new_tokens=12)
    assert [i["baseline"] for i in items] == [r["output"] for r in ROWS]
    rm, tok = AutoModelForSequenceClassification.from_pretrained(reward_model), AutoTokenizer.from_pretrained(reward_model)
    rm.config.pad_token_id = tok.pad_token_id
    convs = [i["messages"] + [{"role": "assistant", "content": i["baseline"]}] for i in items]
    assert [i["baseline_reward"] for i in items] == pytest.approx(reward_scores(rm.eval(), tok, convs).tolist(), abs=1e-5)
    assert all(i["score"] == (1.0 if i["reward"] > i["baseline_reward"] else 0.0) for i in items)
    assert m["win_rate"]["n"] == 3 and m["win_rate"]["value"] == pytest.approx(sum(i["score"] for i in items) / 3)
    assert m["reward_margin"]["scale"] == "raw"
    self_play = roleplay.evaluate(gen, data, 2, gen, judge_model=reward_model, max_new_tokens=12)
    assert self_play["metrics"]["win_rate"]["value"] == 0.5 and self_play["metrics"]["win_rate"]["n"] == 2


def test_needs_a_judge(data, tiny_model_dir):
    with pytest.raises(EvalError, match="needs a judge"):
        roleplay.evaluate(Generator(HFBackend(tiny_model_dir), None), data, 1)
