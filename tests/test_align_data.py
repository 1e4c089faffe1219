"""Alignment data loaders and config: every schema, bad rows, Arrow safety, recipes, ``latest:`` models (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align import data as D
from align.pipeline import AlignConfig
from minitron.config import ConfigError, load_config
from minitron.data import DataError

ROOT = Path(__file__).resolve().parents[1]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sft_schemas_become_prompt_completion_per_assistant_turn():
    alpaca = D.to_sft_examples({"instruction": "Add", "input": "2 and 3", "output": "5"})
    assert alpaca == [{"prompt": [{"role": "user", "content": "Add\n\n2 and 3"}],
                       "completion": [{"role": "assistant", "content": "5"}]}]
    share = D.to_sft_examples({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                                 {"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]})
    assert len(share) == 2 and share[1]["prompt"][-1] == {"role": "user", "content": "?"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    msgs = [{"role": "user", "content": "Weather in Oslo?"}, call, {"role": "tool", "content": "{\"t\": 3}"},
            {"role": "assistant", "content": "3 degrees."}]
    tool = D.to_sft_examples({"messages": msgs, "tools": [TOOL]})
    assert [ex["completion"][0].get("tool_calls") is not None for ex in tool] == [True, False]
    assert tool[0]["tools"] == [TOOL]


def test_toolformer_rows_become_project_tool_calls():
    row = {"instruction": "toolformer: enabled\ntoolformer access: weather\nUseful for weather.\n"
                          "weather(querywithlocation)\nGive the weather for a city",
           "input": "Paris", "output": "The weather in Paris is: weather('weather in Paris')."}
    (ex,) = D.to_sft_examples(row)
    assert ex["tools"][0]["function"]["name"] == "weather"
    assert ex["tools"][0]["function"]["description"] == "Useful for weather."
    assert ex["prompt"][0]["content"] == "Give the weather for a city\n\nParis"
    assert ex["completion"][0]["tool_calls"][0]["function"] == {
        "name": "weather", "arguments": {"querywithlocation": "weather in Paris"}}


def test_preference_schemas_and_hh_transcripts():
    plain = D.to_preference({"prompt": "Say hi without commas.", "chosen": "Hi there", "rejected": "Hi, there"})
    assert plain[0]["prompt"] == [{"role": "user", "content": "Say hi without commas."}]
    assert plain[0]["chosen"] == [{"role": "assistant", "content": "Hi there"}]
    hh = D.to_preference({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: A pun.",
                          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No."})
    assert [m["role"] for m in hh[0]["prompt"]] == ["user", "assistant", "user"]
    assert hh[0]["chosen"][0]["content"] == "A pun." and hh[0]["rejected"][0]["content"] == "No."
    pair = D.to_preference({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go away"})
    assert pair[0]["prompt"] == [{"role": "user", "content": "Hi"}] and pair[0]["chosen"][0]["content"] == "Hello"
    alpaca = D.to_preference({"instruction": "Fix", "input": "he go", "chosen": "He goes.", "rejected": "Whatever."})
    assert alpaca[0]["prompt"][0]["content"] == "Fix\n\nhe go"
    with pytest.raises(ValueError, match="differ before"):
        D.to_preference({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"})


def test_bad_row_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                          {"prompt": "p", "chosen": "same", "rejected": "same"},
                                          {"question": "no schema"}, {"prompt": "q", "chosen": "c", "rejected": "d"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: .*identical.*--skip-bad-rows"):
        D.load_rows([str(f)], "train", D.to_preference, skip_bad_rows=False)
    rows, stats = D.load_rows([str(f)], "train", D.to_preference, skip_bad_rows=True)
    assert len(rows) == 2 and (stats.rows, stats.skipped) == (4, 2)
    assert stats.errors[1].startswith(f"{f}:3:")
    bad_json = _jsonl(tmp_path / "broken.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{oops"])
    with pytest.raises(DataError, match="broken.jsonl:2"):
        D.load_rows([str(bad_json)], "train", D.to_preference, skip_bad_rows=False)
    with pytest.raises(DataError, match="not found"):
        D.load_rows([str(tmp_path / "missing.jsonl")], "train", D.to_preference, False)


def test_datasets_are_arrow_safe_and_render_tool_calls(tiny_tokenizer):
    """Differing tool-argument keys must not become null-filled structs in Arrow (they would render as nulls)."""
    rows = D.to_sft_examples({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}], "tools": [TOOL]})
    rows += D.to_sft_examples({"instruction": "b", "input": "", "output": "c"})
    rows += D.to_sft_examples({"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "g", "arguments": {"y": "z"}}}]}]})
    ds = D.to_dataset(rows)
    first = ds[0]
    tools = json.loads(first["tools"])
    text = tiny_tokenizer.apply_chat_template(first["prompt"] + first["completion"], tools=tools, tokenize=False)
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>' in text
    assert text.startswith(tiny_tokenizer.bos_token) and "null" not in text and "<tools>" in text
    assert ds[2]["completion"][0]["tool_calls"][0]["function"]["arguments"] == '{"y": "z"}'


def test_tool_schemas_survive_a_first_row_without_tools():
    """Dataset.from_list takes its columns from the first row: a plain first row once dropped every row's tools."""
    rows = D.to_sft_examples({"instruction": "b", "input": "", "output": "c"})
    rows += D.to_sft_examples({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}], "tools": [TOOL]})
    ds = D.to_dataset(rows)
    assert ds[0]["tools"] is None
    assert json.loads(ds[1]["tools"]) == [TOOL]


def test_shared_real_data_loads(request):
    from conftest import shared_data

    sft, pref = shared_data("sft"), shared_data("preference")
    rows, stats = D.load_rows([str(sft / "gpteacher_toolformer.jsonl")], "train", D.to_sft_examples, True, limit=200)
    assert len(rows) == 200 and all("tools" in r for r in rows)
    pairs, _ = D.load_rows([str(pref / "hh_rlhf")], "train", D.to_preference, True, limit=50)
    assert len(pairs) == 50 and all(p["prompt"][-1]["role"] == "user" for p in pairs)


def test_recipes_parse_against_align_config():
    for name in ("demo", "real-data"):
        cfg = load_config(AlignConfig, ROOT / "configs" / "align" / f"{name}.yaml", section="align")
        assert cfg.stages == ["sft", "rm", "dpo", "rl"] and cfg.sft.steps > 0
        assert (ROOT / "configs" / "align" / f"{name}.yaml").read_text().startswith("#")
    demo = load_config(AlignConfig, ROOT / "configs/align/demo.yaml", section="align",
                       overrides={"stages": ["sft,dpo"], "max_steps": "3", "rl.algo": "grpo", "sft_eval_data": [""]})
    assert demo.stages == ["sft", "dpo"] and demo.max_steps == 3 and demo.rl.algo == "grpo"
    assert demo.sft_eval_data == [] and demo.model == "latest:runs/demo/distilled"
    with pytest.raises(ConfigError, match="subset of sft,rm,dpo,rl"):
        AlignConfig(stages=["sft", "ppo"])
    with pytest.raises(ConfigError, match="final must be"):
        AlignConfig(final="rm")
    with pytest.raises(ConfigError, match="rl.algo"):
        load_config(AlignConfig, None, overrides={"rl.algo": "a2c"})


def test_source_labels_name_the_file_or_hub_set():
    assert D.source_label("../shared/data/preference/hh_rlhf/helpful-online_test.jsonl.gz") == "helpful-online_test"
    assert D.source_label("/data/pairs/") == "pairs" and D.source_label("Anthropic/hh-rlhf@test") == "hh-rlhf"


def test_per_source_metrics_split_the_held_out_pairs_and_agree_with_the_whole():
    import torch

    from align.dpo import held_out_metrics, margin_metrics

    pairs = [{"source": s} for s in ("a", "b", "a", "b")]
    ref, after = [1.0, -2.0, 0.5, 3.0], torch.tensor([2.0, -1.0, 0.0, 3.5])
    m = held_out_metrics(ref, after, 0.1, pairs)
    assert m["by_source"]["a"] == margin_metrics([1.0, 0.5], after[[0, 2]], 0.1)
    assert m["by_source"]["b"]["logp_margin"] == pytest.approx(1.25) and m["by_source"]["b"]["eval_n"] == 2
    assert "by_source" not in held_out_metrics(ref, after, 0.1, [{"source": "a"}] * 4)  # one source: no split
