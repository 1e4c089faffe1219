"""The SFT mix: IFEval-type constraints checked by lm-eval, teacher answers (cached), RAG examples, held-out splits."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from align import constraints, sft_mix
from align import data as D
from align import pipeline as AP
from minitron.config import ConfigError
from minitron.punkt import ifeval_instructions

ANSWER = ("Paris is the capital of France. It lies on the Seine river. About two million people live in the city. "
          "Many visitors come for its museums and food.")


def _checker(rule_id: str):
    registry, _, _ = ifeval_instructions()
    return registry[rule_id](rule_id)


@pytest.mark.parametrize("rule_id", sorted(constraints.RULES))
def test_every_rule_rewrites_the_answer_so_that_lm_evals_checker_accepts_it(rule_id):
    _, _, util = ifeval_instructions()
    rng = random.Random(1)
    made = constraints.RULES[rule_id](ANSWER, "Tell me about Paris.", rng, util)
    assert made is not None
    kwargs, text = made
    checker = _checker(rule_id)
    description = checker.build_description(**kwargs)
    assert checker.check_following(text), (rule_id, kwargs, text)
    assert description and description not in ANSWER


def test_constrain_appends_descriptions_and_drops_what_the_checker_rejects():
    rng = random.Random(0)
    made = [constraints.constrain("Tell me about Paris.", ANSWER, rng, 2) for _ in range(40)]
    kept = [m for m in made if m is not None]
    assert len(kept) >= 20
    for m in kept:
        assert m["prompt"].startswith("Tell me about Paris.") and len(m["prompt"]) > len("Tell me about Paris.")
        for rule_id, kw in zip(m["instruction_id_list"], m["kwargs"]):
            checker = _checker(rule_id)
            checker.build_description(**kw)
            assert checker.check_following(m["answer"])
    # a combination that cannot hold is dropped, not emitted: 40 words asked "at least" of a 5-word answer
    registry, _, util = ifeval_instructions()
    words = registry["length_constraints:number_words"]("length_constraints:number_words")
    words.build_description(relation="at least", num_words=40)
    assert not words.check_following("Paris is in France today.")


def test_constraints_respect_lm_evals_conflict_table():
    _, conflicts, _ = ifeval_instructions()
    rng = random.Random(3)
    for _ in range(60):
        m = constraints.constrain("Tell me about Paris.", ANSWER, rng, 3)
        if m is None:
            continue
        ids = m["instruction_id_list"]
        assert len(ids) == len(set(ids))
        assert not any(b in conflicts.get(a, ()) for a in ids for b in ids if a != b)


def _sft_rows(n: int) -> list[dict]:
    return [ex for i in range(n) for ex in D.to_sft_examples(
        {"instruction": f"Question {i}: name a colour.", "input": "", "output": f"Colour number {i} is blue. It is calm."})]


def test_mix_replaces_a_share_with_cached_teacher_answers_and_adds_rag_and_constraints(tmp_path, tiny_model_dir):
    nq = tmp_path / "nq.jsonl"
    names = ["alder", "birch", "cedar", "dogwood", "elm", "fir", "ginkgo", "hazel", "juniper", "larch", "maple", "oak"]
    nq.write_text("".join(json.dumps({"question": f"who wrote the {n} book", "answers": [f"Author {n.title()}"],
                                      "ctxs": [{"title": f"The {n} book", "text": f"The {n} book was written by "
                                                f"Author {n.title()}.", "isgold": True}]}) + "\n" for n in names))
    args = sft_mix.SFTMixArgs(teacher=str(tiny_model_dir), teacher_share=0.5, teacher_max_new_tokens=8,
                              teacher_dtype="float32", rag_data=[str(nq)], rag_examples=6, rag_top_k=2,
                              constraint_share=0.5)
    rows = _sft_rows(12)
    mixed, stats = sft_mix.build(args, rows, tmp_path / "work", seed=0)
    assert stats["teacher_asked"] == 6 and stats["teacher_answers"] + stats["teacher_cut"] == 6
    cache_file = sft_mix.answer_cache(tmp_path / "work", args)
    assert cache_file.parent == tmp_path / "teacher_answers"  # beside the SFT work dir, which a redone SFT moves aside
    cache = cache_file.read_text().splitlines()
    assert len(cache) == 6
    assert stats["rag_examples"] == 6 and len(mixed) == 18
    rag = [ex for ex in mixed if ex["prompt"][0]["role"] == "system"]
    assert len(rag) == 6 and all("Passages:" in ex["prompt"][-1]["content"] for ex in rag)
    # the gold passage is the only one naming the book, so BM25 finds it: the answer is the gold answer
    assert all(ex["completion"][0]["content"].startswith("Author") for ex in rag)
    assert stats["constrained"] >= 1
    # a second build reads the teacher's answers from the cache: nothing new is generated
    again, stats2 = sft_mix.build(args, rows, tmp_path / "work", seed=0)
    assert cache_file.read_text().splitlines() == cache
    assert stats2 == stats and again == mixed
    # another teacher decoding setting is another file: answers cut at 8 tokens are not reused at 16
    assert sft_mix.answer_cache(tmp_path / "work", dataclasses.replace(args, teacher_max_new_tokens=16)) != cache_file


def test_mix_config_errors():
    with pytest.raises(ConfigError, match="teacher"):
        sft_mix.SFTMixArgs(teacher_share=0.2)
    with pytest.raises(ConfigError, match="rag_data"):
        sft_mix.SFTMixArgs(rag_examples=5)
    with pytest.raises(ConfigError, match="\\[0, 1\\]"):
        sft_mix.SFTMixArgs(constraint_share=1.5)


def test_eval_source_that_is_also_a_training_source_is_held_out_of_it(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"a{i}", "input": "", "output": "x"}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"instruction": f"b{i}", "input": "", "output": "y"}) + "\n" for i in range(20)))
    cfg = AP.AlignConfig(model="unused", sft_data=[str(a), str(b)], sft_eval_data=[str(b)], eval_rows=5)
    train, held, info = AP.load_split_rows(cfg, cfg.sft_data, cfg.sft_eval_data, D.to_sft_examples)
    held_users = {ex["prompt"][0]["content"] for ex in held}
    train_users = {ex["prompt"][0]["content"] for ex in train}
    assert len(held) == 5 and all(u.startswith("b") for u in held_users)
    assert not held_users & train_users and len(train) == 35


def test_fit_pairs_drops_the_earliest_turns_then_whole_pairs():
    turn = lambda r, c: {"role": r, "content": c}  # noqa: E731
    pair = {"prompt": [turn("user", "a " * 50), turn("assistant", "b " * 50), turn("user", "short?")],
            "chosen": [turn("assistant", "yes")], "rejected": [turn("assistant", "no")]}
    words = lambda msgs: sum(len(m["content"].split()) for m in msgs)  # noqa: E731
    kept, dropped = D.fit_pairs([pair], words, 20)
    assert dropped == 0 and kept[0]["prompt"] == [turn("user", "short?")]
    kept, dropped = D.fit_pairs([pair], words, 200)
    assert kept[0]["prompt"] == pair["prompt"]
    kept, dropped = D.fit_pairs([pair], words, 1)
    assert kept == [] and dropped == 1


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_chatml_template_without_tools_gets_the_project_template(tiny_tokenizer):
    import copy

    from minitron.chat_format import ensure_tool_template

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = SMOL_TEMPLATE  # SmolLM2-135M's: tools and tool_calls vanish from the rendering
    call = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert "get_weather" not in tok.apply_chat_template(call, tools=tools, tokenize=False)
    size = len(tok)
    assert ensure_tool_template(tok) and len(tok) == size  # no token added
    text = tok.apply_chat_template(call, tools=tools, tokenize=False)
    assert '<tools>\n{"name": "get_weather"' in text and '<tool_call>{"name": "get_weather"' in text
    assert not ensure_tool_template(tok)  # a template that renders tools is kept


def test_constrained_prompts_reward_the_answers_that_obey_them():
    """RLVR's prompts carry constraints the checker can verify: the rewritten answer earns 1, a bare one less."""
    from align.rl import constraint_reward

    examples = [{"prompt": [{"role": "user", "content": f"Describe the harbor number {i}."}],
                 "completion": [{"role": "assistant", "content": "The harbor is busy. Boats come and go all day, "
                                                                 "and the gulls follow them. It smells of salt."}]}
                for i in range(40)]
    made = constraints.constrained_prompts(examples, 12, random.Random(0), max_constraints=2)
    assert len(made) == 12 and all(m["prompt"][-1]["content"].startswith("Describe the harbor") for m in made)
    specs = [json.loads(m["constraints"]) for m in made]
    assert all(1 <= len(s["instruction_id_list"]) <= 2 for s in specs)
    bare = "the harbor is busy"
    rewards = constraint_reward(prompts=[m["prompt"] for m in made] + [[]],
                                completions=[[{"role": "assistant", "content": bare}]] * 13,
                                constraints=[m["constraints"] for m in made] + [""])
    assert rewards[-1] is None and all(0 <= r <= 1 for r in rewards[:-1]) and min(rewards[:-1]) < 1
    # an answer built to obey a spec earns the full reward
    c = constraints.constrain("Describe the harbor.", "The harbor is busy. Boats come and go.", random.Random(3), 2)
    spec = json.dumps({"instruction_id_list": c["instruction_id_list"], "kwargs": c["kwargs"]})
    assert constraint_reward(prompts=[[]], completions=[[{"role": "assistant", "content": c["answer"]}]],
                             constraints=[spec]) == [1.0]
    assert constraints.obeyed("", c["instruction_id_list"], c["kwargs"]) == [False] * len(c["kwargs"])


def test_constraint_pairs_contrast_the_format_only():
    """DPO's format pairs: chosen obeys every constraint in the prompt, rejected is the data's own answer and breaks
    at least one."""
    answer = "The harbor is busy. Boats come and go all day, and the gulls follow them. It smells of salt."
    examples = [{"prompt": [{"role": "user", "content": f"Describe the harbor number {i}."}],
                 "completion": [{"role": "assistant", "content": answer}]} for i in range(40)]
    pairs = constraints.constraint_pairs(examples, 10, random.Random(0), max_constraints=2)
    assert len(pairs) == 10 and all(p["source"] == "format_constraints" for p in pairs)
    for p in pairs:
        assert p["prompt"][-1]["content"].startswith("Describe the harbor") and p["rejected"][0]["content"] == answer
        assert p["chosen"][0]["content"] != answer
        spec = json.loads(p["constraints"])
        assert all(constraints.obeyed(p["chosen"][0]["content"], spec["instruction_id_list"], spec["kwargs"]))
        assert not all(constraints.obeyed(answer, spec["instruction_id_list"], spec["kwargs"]))


def test_tool_distractors_show_tools_to_plain_answers(tmp_path):
    """Some single-turn examples are shown a tool-use example's tools and keep answering in text."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"prompt": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool],
            "completion": [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]}
    rows = _sft_rows(10) + [call]
    mixed, stats = sft_mix.build(sft_mix.SFTMixArgs(tool_distractors=4), rows, tmp_path, seed=0)
    shown = [ex for ex in mixed if ex.get("tools") and not ex["completion"][0].get("tool_calls")]
    assert stats["tool_distractors"] == 4 and len(shown) == 4 and len(mixed) == 11
    assert all(ex["tools"] == [tool] and ex["completion"][0]["content"].startswith("Colour") for ex in shown)
    assert sum(bool(ex["completion"][0].get("tool_calls")) for ex in mixed) == 1
    # no tool-use example in the data: nothing to show, nothing changes
    _, none = sft_mix.build(sft_mix.SFTMixArgs(tool_distractors=4), _sft_rows(10), tmp_path, seed=0)
    assert "tool_distractors" not in none
