"""Function calling scored as BFCL scores it: BFCL's own checker (bfcl-eval), the project's decoding, eval-fc.

The agreement tests score upstream's ground truth and systematic corruptions of it with the project's path and
with BFCL's own pipeline (``evals.bfcl_agreement``) and require at least 99.5% same verdicts per category: on
the demo world's BFCL files (always), ../shared/data/bfcl (when present) and BFCL's live categories shipped in
bfcl-eval itself. The behaviour tests pin what the project adds: the two modes (tool calls: FC, dots may come
back as underscores; text: BFCL's prompt mode, where a python-fenced answer fails), ``lenient``, and eval-fc.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import refused, shared_data
from evals import bfcl, bfcl_agreement
from evals.bfcl_checker import check
from evals.bfcl_decode import FC, PROMPT, Decoded, decode_reply
from evals.bfcl_upstream import INSTALL, BFCLMissing, upstream
from minitron.tool_schema import to_openai_tools

FN = {"name": "geo.distance", "description": "Distance between two cities.", "parameters": {
    "type": "dict", "required": ["origin", "destination"], "properties": {
        "origin": {"type": "string", "description": "start"}, "destination": {"type": "string", "description": "end"},
        "unit": {"type": "string", "description": "km or mi"}, "precision": {"type": "float", "description": "p"},
        "stops": {"type": "array", "items": {"type": "integer"}, "description": "s"},
        "opts": {"type": "dict", "description": "o", "properties": {"fast": {"type": "boolean"}}}}}}
Q = {"id": "custom_0", "question": [[{"role": "user", "content": "How far?"}]], "function": [FN]}
GT = [{"geo.distance": {"origin": ["New York, NY", "NYC"], "destination": ["Boston"], "unit": ["km", ""],
                        "precision": [1.0, ""], "stops": [[1, 2], ""], "opts": [{"fast": [True, ""]}, ""]}}]
NYC = "origin='NYC', destination='Boston'"


def tool_call(name: str, args: dict) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(args)}}}</tool_call>'


# ---------------------------------------------------------------- agreement with upstream BFCL


def assert_agreement(results: dict, capsys, label: str) -> None:
    with capsys.disabled():
        print(f"\n{bfcl_agreement.table({label: results})}")
    for cat, st in results.items():
        assert st["n"] > 0 and st["agreement"] >= bfcl_agreement.TARGET, (cat, st["agreement"], st["examples"])
        if "irrelevance" not in cat and "relevance" not in cat:
            assert st["upstream_valid"] > 0 and st["upstream_valid"] < st["n"], cat  # both verdicts are exercised


def test_agreement_demo_world(tmp_path, capsys):
    from minitron.world import WorldConfig, ensure_world

    world = ensure_world(WorldConfig(out=str(tmp_path / "world"), n_entities=30, n_rag_entities=8, corpus_repeats=2,
                                     n_mc_test=40, n_ifeval=14, n_rag=9, n_bfcl=12, n_sft=40, n_errands=20,
                                     n_preference=30, n_roleplay_eval=4))
    results = bfcl_agreement.measure(world / "bfcl")
    assert set(results) == {"simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"}
    assert_agreement(results, capsys, "demo world")


@pytest.mark.shared_data
def test_agreement_shared_data(capsys):
    results = bfcl_agreement.measure(shared_data("bfcl"))
    assert set(results) == {"simple_python", "multiple", "parallel", "parallel_multiple", "simple_java",
                            "simple_javascript", "irrelevance"}
    assert_agreement(results, capsys, "shared data")


def test_agreement_bfcl_categories_not_shipped_here(capsys):
    """BFCL's live categories (in bfcl-eval's own data, not in ../shared/data), 80 questions each."""
    import bfcl_eval

    data = Path(bfcl_eval.__file__).parent / "data"
    live = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
            "live_relevance"]
    assert_agreement(bfcl_agreement.measure(data, limit=80, categories=live), capsys, "bfcl-eval live")


def test_reference_is_upstream_pipeline():
    """The agreement's reference really is BFCL's: a dotted FC name is wrong for a model shown underscored tools,
    a python fence fails in prompt mode, and an irrelevance reply that does not decode holds no call."""
    dotted_call = {"name": "geo.distance", "arguments": json.dumps({"origin": "NYC", "destination": "Boston"})}
    fc_dotted = bfcl_agreement.Reply("x", "fc_underscore", calls=[{"type": "function", "function": dotted_call}],
                                     underscored=True)
    assert bfcl_agreement.upstream_verdict(Q, GT, "simple_python", fc_dotted) == (False, False)
    fenced = bfcl_agreement.Reply("x", "prompt_fenced", text=f"```python\ngeo.distance({NYC})\n```")
    assert bfcl_agreement.upstream_verdict(Q, GT, "simple_python", fenced) == (False, False)
    assert bfcl_agreement.upstream_verdict(Q, None, "irrelevance", fenced) == (True, False)


# ---------------------------------------------------------------- the two modes


def test_prompt_mode_python_fence_fails_and_lenient_accepts_it_apart():
    fenced = f"Here you go:\n```python\n[geo.distance({NYC})]\n```"
    v = bfcl.score(Q, GT, "simple_python", text=fenced)
    assert not v.valid and v.error_type == "ast_decoder:decoder_failed" and v.mode == PROMPT
    lv = bfcl.score(Q, GT, "simple_python", text=fenced, lenient=True)
    assert lv.valid and lv.fenced and not lv.strict_valid
    assert bfcl.score(Q, GT, "simple_python", text=f"[geo.distance({NYC})]").valid  # no fence: fine
    assert bfcl.score(Q, GT, "simple_python", text=f"```\ngeo.distance({NYC})\n```").valid  # BFCL strips bare ```
    # lenient reads the fence only when the text itself does not decode; a wrong fenced answer stays wrong
    bad = bfcl.score(Q, GT, "simple_python", text="```python\ngeo.distance(origin='LA', destination='Boston')\n```",
                     lenient=True)
    assert not bad.valid and bad.fenced
    # irrelevance: upstream reads a fenced call as no call; lenient reads the call
    call = f"```python\ngeo.distance({NYC})\n```"
    assert bfcl.score(Q, None, "irrelevance", text=call).valid
    assert not bfcl.score(Q, None, "irrelevance", text=call, lenient=True).valid


def test_underscored_names_only_in_fc_mode():
    args = {"origin": "NYC", "destination": "Boston"}
    for name in ("geo.distance", "geo_distance"):  # tool calls (FC mode): both spellings, text or structured
        assert bfcl.score(Q, GT, "simple_python", text=tool_call(name, args)).mode == FC
        assert bfcl.score(Q, GT, "simple_python", text=tool_call(name, args)).valid, name
        assert bfcl.score(Q, GT, "simple_python", calls=[{"name": name, "arguments": args}]).valid, name
        assert bfcl.score(Q, GT, "simple_python", calls=[{name: json.dumps(args)}]).valid  # BFCL's result shape
    assert bfcl.score(Q, GT, "simple_python", text=f"geo.distance({NYC})").valid  # prompt mode: dotted only
    v = bfcl.score(Q, GT, "simple_python", text=f"geo_distance({NYC})")
    assert not v.valid and v.error_type == "simple_function_checker:wrong_func_name"
    # only an offered dotted name gets the underscore spelling: a dot the tool never had is a wrong name
    plain = {**Q, "function": [{**FN, "name": "geo_distance"}]}
    assert bfcl.score(plain, [{"geo_distance": GT[0]["geo.distance"]}], "simple_python",
                      text=tool_call("geo_distance", args)).valid
    assert not bfcl.score(plain, [{"geo_distance": GT[0]["geo.distance"]}], "simple_python",
                          text=tool_call("geo.distance", args)).valid


def test_decoded_form():
    d = decode_reply(tool_call("geo.distance", {"origin": "NYC"}) + "<|im_end|>", functions=[FN],
                     category="simple_python")
    assert d == Decoded([{"geo_distance": {"origin": "NYC"}}], FC)  # BFCL's FC spelling
    d = decode_reply(f"[geo.distance({NYC}), f(x=[1, 2])]<|im_end|>", functions=[FN], category="simple_python")
    assert d == Decoded([{"geo.distance": {"origin": "NYC", "destination": "Boston"}}, {"f": {"x": [1, 2]}}], PROMPT)
    openai = {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert decode_reply(calls=openai, functions=[], category="simple_python").calls == [{"f": {"a": 1}}]
    for bad in ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "<tool_call>{not json</tool_call>"):
        d = decode_reply(bad, functions=[], category="simple_python")
        assert d.calls is None and d.mode == FC and d.error
    # plain JSON text is not a call in BFCL's prompt mode, nor is prose
    for text in ('{"name": "geo.distance", "arguments": {"origin": "NYC"}}', "The distance is 300 km."):
        d = decode_reply(text, functions=[FN], category="simple_python")
        assert d.calls is None and d.mode == PROMPT


def test_prompt_decoder_evaluates_constant_arithmetic_only(tmp_path):
    q = {"id": "x", "function": [{"name": "f", "parameters": {"type": "dict", "required": ["n"],
                                                              "properties": {"n": {"type": "integer"}}}}]}
    assert bfcl.score(q, [{"f": {"n": [6]}}], "simple_python", text="f(n=2*3)").valid  # as BFCL's eval
    marker = tmp_path / "ran"
    code = f"f(n=__import__('pathlib').Path({str(marker)!r}).touch() + 1)"  # upstream would eval() this BinOp
    v = bfcl.score(q, [{"f": {"n": [2]}}], "simple_python", text=code)
    assert not v.valid and "not constant arithmetic" in v.error and not marker.exists()
    assert "too large" in bfcl.score(q, [{"f": {"n": [2]}}], "simple_python", text="f(n=9**9**9)").error


@pytest.mark.parametrize("args, valid", [  # BFCL's rules, as its checker applies them to tool calls
    ({"origin": "new york ny", "destination": "BOSTON"}, True),  # case, spaces and ,./-_*^ ignored
    ({"origin": "NYC", "destination": "Boston", "unit": "km", "precision": 1}, True),  # int accepted for float
    ({"origin": "NYC", "destination": "Boston", "stops": [1, 2], "opts": {}}, True),  # dict key may be omitted
    ({"origin": "NYC", "destination": "Boston", "opts": {"slow": True}}, False),  # unexpected dict key
    ({"origin": "NYC", "destination": "Boston", "stops": [2, 1]}, False),  # list order matters
    ({"origin": "NYC", "destination": "Boston", "stops": [1.0, 2]}, True),  # BFCL: 1.0 == 1 in its list check
    ({"origin": "NYC", "destination": "Boston", "unit": "mi"}, False),
    ({"origin": "NYC", "destination": "Boston", "unit": "", "stops": []}, True),  # "" / [] read as left out
    ({"origin": "NYC", "destination": "Boston", "precision": ""}, False),  # but "" is no float
    ({"origin": "New\tYork NY", "destination": "Boston"}, False),  # only spaces are ignored
    ({"origin": "NYC", "destination": "Boston", "precision": "1.0"}, False),  # wrong type
    ({"origin": 5, "destination": "Boston"}, False),
    ({"origin": "NYC"}, False),  # missing required
    ({"origin": "NYC", "destination": "Boston", "zz": 1}, False),  # unexpected parameter
])
def test_bfcl_rules(args, valid):
    v = bfcl.score(Q, GT, "simple_python", calls=[{"name": "geo_distance", "arguments": args}])
    assert v.valid is valid, v
    assert valid or v.error and ":" in v.error_type  # BFCL's error type tags


def test_java_fc_values_are_source_strings():
    q = {"id": "simple_java_x", "function": [{"name": "A.b", "parameters": {"type": "dict", "required": ["n", "on"],
         "properties": {"n": {"type": "long"}, "on": {"type": "boolean"},
                        "xs": {"type": "ArrayList", "items": {"type": "String"}}}}}]}
    gt = [{"A.b": {"n": [5], "on": [False], "xs": [["a b"], ""]}}]
    ok = {"n": "5L", "on": "false", "xs": 'new ArrayList<>(Arrays.asList("A B"))'}
    assert bfcl.score(q, gt, "simple_java", calls=[{"name": "A_b", "arguments": ok}]).valid
    assert bfcl.score(q, gt, "simple_java", text='A.b(n=5L, on=false, xs=new ArrayList<>(Arrays.asList("A B")))').valid
    typed = bfcl.score(q, gt, "simple_java", calls=[{"name": "A.b", "arguments": {"n": 5, "on": False}}])
    assert not typed.valid and typed.error_type == "type_error:java"  # BFCL: Java values come as strings
    assert not bfcl.score(q, gt, "simple_java", calls=[{"name": "A.b", "arguments": {**ok, "n": "6L"}}]).valid


def test_relevance_irrelevance_and_unsupported():
    assert bfcl.score(Q, None, "irrelevance", text="I can't help with that.").valid
    assert not bfcl.score(Q, None, "irrelevance", text=tool_call("geo.distance", {})).valid
    assert not bfcl.score(Q, None, "irrelevance", text="geo.distance()").valid
    assert bfcl.score(Q, None, "irrelevance", text="[]").valid  # an empty list of calls is no call
    assert bfcl.score(Q, None, "live_relevance", text=tool_call("geo.distance", {})).valid
    v = bfcl.score(Q, None, "live_relevance", text="No.")
    assert not v.valid and v.error_type == "relevance_error:decoder_failed"
    v = check(Q, [["ls()"]], Decoded([{"ls": {}}], FC), "multi_turn_base")
    assert not v.valid and "not AST-checked" in v.error


def test_checker_crash_is_one_wrong_reply():
    """Where BFCL's runner would stop (its checker raising on a data quirk), the reply is wrong with the reason."""
    q = {"id": "x", "function": [{"name": "f", "parameters": {"type": "dict", "required": [],
                                                              "properties": {"xs": {"type": "array"}}}}]}
    v = bfcl.score(q, [{"f": {"xs": [[1]]}}], "simple_python", calls=[{"f": {"xs": [1]}}])
    assert not v.valid and v.error_type == "checker_error" and "KeyError" in v.error


def test_missing_bfcl_eval_is_refused_in_one_line(tmp_path, monkeypatch, tiny_bfcl):
    upstream.cache_clear()
    monkeypatch.setitem(sys.modules, "bfcl_eval.eval_checker.ast_eval.ast_checker", None)  # as if not installed
    try:
        with pytest.raises(BFCLMissing, match="install it with"):
            upstream()
        preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "irrelevance_0", "text": "Hello!"}])
        line = refused(["eval-fc", "--questions", tiny_bfcl, "--predictions", preds],
                       r"BFCL's own checker.*pip install --no-deps bfcl-eval==2026\.3\.23 tree_sitter==0\.21\.3")
        assert INSTALL in line
        with pytest.raises(BFCLMissing):
            bfcl.build_requests(tiny_bfcl)  # the eval harness reads its data this way before generating
    finally:
        monkeypatch.undo()
        upstream.cache_clear()
    assert upstream().version == "2026.3.23"


# ---------------------------------------------------------------- handcrafted files: CLI and evaluate


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_bfcl(tmp_path) -> Path:
    """A data dir with a simple, a parallel-style custom category, and an irrelevance category."""
    d = tmp_path / "bfcl"
    fn2 = {"name": "weather", "description": "w", "parameters": {"type": "dict", "required": ["city"],
           "properties": {"city": {"type": "string", "description": "c"}}}}
    write_jsonl(d / "BFCL_v4_simple_python.json", [Q, {**Q, "id": "simple_python_1"}])
    write_jsonl(d / "possible_answer/BFCL_v4_simple_python.json", [{"id": "custom_0", "ground_truth": GT},
                                                                   {"id": "simple_python_1", "ground_truth": GT}])
    par = {"id": "my_parallel_0", "question": [[{"role": "user", "content": "Weather in A and B?"}]], "function": [fn2]}
    write_jsonl(d / "BFCL_v4_my_parallel.json", [par])
    write_jsonl(d / "possible_answer/BFCL_v4_my_parallel.json", [{"id": "my_parallel_0", "ground_truth": [
        {"weather": {"city": ["A"]}}, {"weather": {"city": ["B"]}}]}])
    write_jsonl(d / "BFCL_v4_irrelevance.json", [{"id": "irrelevance_0", "question": [[{"role": "user", "content": "Hi"}]],
                                                  "function": [fn2]}])
    return d


def run_cli(*args: str):
    from minitron.cli import app

    return CliRunner().invoke(app, ["eval-fc", *args])


def test_cli_end_to_end(tiny_bfcl, tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "my_parallel_0", "calls": [{"weather": {"city": "b"}}, {"weather": {"city": "A"}}]},
        {"id": "custom_0", "text": tool_call("geo.distance", {"origin": "NYC", "destination": "Boston"})},
        {"id": "custom_0", "calls": [{"geo.distance": {"origin": "LA", "destination": "Boston"}}]},  # same id again
        {"id": "irrelevance_0", "text": "Hello!"},
        {"id": "my_parallel_0", "text": "weather(city='A')"},
        {"id": "custom_0", "calls": [{"name": "geo_distance", "arguments": {"origin": "NYC", "destination": "boston"}}]},
        {"id": "custom_0", "text": f"```python\ngeo.distance({NYC})\n```"},  # prompt mode: fails unless --lenient
    ])
    verdicts = tmp_path / "v.jsonl"
    res = run_cli("--questions", str(tiny_bfcl), "--predictions", str(preds), "--verdicts", str(verdicts))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout holds only the JSON (logs go to stderr)
    v = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert [x["id"] for x in v] == ["my_parallel_0", "custom_0", "custom_0", "irrelevance_0", "my_parallel_0",
                                    "custom_0", "custom_0"]
    assert [x["valid"] for x in v] == [True, True, False, True, False, True, False]
    assert all(x["error"] for x in v if not x["valid"])
    cats = summary["categories"]
    assert cats["simple_python"]["n"] == 4 and cats["simple_python"]["correct"] == 2
    assert cats["my_parallel"]["accuracy"] == 0.5 and cats["irrelevance"]["accuracy"] == 1.0
    assert summary["checker"] == "bfcl-eval 2026.3.23" and "lenient" not in summary
    res = run_cli("--questions", str(tiny_bfcl), "--predictions", str(preds), "--lenient")
    assert res.exit_code == 0, res.output
    lenient = json.loads(res.stdout)
    sp = lenient["categories"]["simple_python"]
    assert lenient["lenient"] and sp["correct"] == 3 and sp["strict_correct"] == 2 and sp["fenced"] == 1
    assert lenient["overall"]["strict_correct"] == summary["overall"]["correct"] == 4


def test_cli_single_files_and_errors(tiny_bfcl, tmp_path):
    q, a = tiny_bfcl / "BFCL_v4_my_parallel.json", tiny_bfcl / "possible_answer/BFCL_v4_my_parallel.json"
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "my_parallel_0", "calls": [{"weather": {"city": "A"}}]}])
    res = run_cli("--questions", str(q), "--answers", str(a), "--predictions", str(preds))
    assert res.exit_code == 0 and '"my_parallel"' in res.stdout and '"correct": 0' in res.stdout
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"id": "nope_3", "text": ""}])
    res = run_cli("--questions", str(q), "--answers", str(a), "--predictions", str(unknown))
    assert res.exit_code == 2 and "nope_3" in res.output
    res = run_cli("--predictions", str(preds))
    assert res.exit_code == 2 and "--questions" in res.output


def test_cli_category_from_id_prefix(tmp_path):
    """Files not named BFCL_v4_<category>.json: the category comes from the id prefix."""
    q = write_jsonl(tmp_path / "questions.jsonl", [{**Q, "id": "live_multiple_7-2-1"}])
    a = write_jsonl(tmp_path / "answers.jsonl", [{"id": "live_multiple_7-2-1", "ground_truth": GT}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "live_multiple_7-2-1", "text": f"geo.distance({NYC})"}])
    res = run_cli("--questions", str(q), "--answers", str(a), "--predictions", str(preds))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["categories"] == {"live_multiple": {"accuracy": 1.0, "n": 1, "correct": 1, "stderr": 0.0}}


def test_category_names():
    assert bfcl.category_of_file("BFCL_v4_parallel_multiple.json") == "parallel_multiple"
    assert bfcl.category_of_file("BFCL_v3_live_simple.json") == "live_simple"
    assert bfcl.category_of_id("simple_java_12") == "simple_java"
    assert bfcl.category_of_id("live_simple_19-3-15") == "live_simple"


def test_openai_tools():
    (tool,) = to_openai_tools([FN], "simple_python")
    f = tool["function"]
    assert tool["type"] == "function" and f["name"] == "geo.distance" and f["parameters"]["type"] == "object"
    assert f["parameters"]["properties"]["opts"]["type"] == "object"
    assert f["parameters"]["properties"]["precision"]["type"] == "number"
    assert f["parameters"]["properties"]["opts"]["properties"]["fast"]["type"] == "boolean"
    assert FN["parameters"]["type"] == "dict"  # the input is not modified
    assert f["description"].endswith("Python 3 syntax.") and "float type" in f["parameters"]["properties"]["precision"]["description"]
    (plain,) = to_openai_tools([FN], "simple_python", hints=False)
    assert plain["function"]["description"] == FN["description"] and "format" not in plain["function"]["parameters"]["properties"]["precision"]
    (jt,) = to_openai_tools([FN], "simple_java", underscore_names=True)
    assert jt["function"]["name"] == "geo_distance"
    assert all(p["type"] == "string" for p in jt["function"]["parameters"]["properties"].values())
    assert "Java float type" in jt["function"]["parameters"]["properties"]["precision"]["description"]
    assert bfcl.build_requests  # the eval offers these tools: evals.bfcl.build_requests uses this converter
    assert bfcl.to_openai_tools is to_openai_tools


def _ground_truth_generator(data_dir: Path):
    """A real generate_fn that answers each question with its ground truth as tool calls (none for irrelevance)."""
    answers = bfcl.load_answers(None, data_dir)
    by_prompt = {}
    for qid, (cat, q) in bfcl.load_questions(data_dir).items():
        gt = answers.get(qid)
        if gt is None:
            text = "I can't do that."
        else:
            calls = bfcl_agreement.source_values(q, bfcl_agreement.answer(q, gt), cat, prompt=False)
            text = "".join(tool_call(n, a) for n, a in calls)
        by_prompt[json.dumps(q["question"][0], sort_keys=True)] = text

    def generate(messages, tools):
        assert tools and all(t["type"] == "function" for t in tools)
        return by_prompt[json.dumps(messages, sort_keys=True)]

    return generate


def test_evaluate_tiny(tiny_bfcl):
    res = bfcl.evaluate(_ground_truth_generator(tiny_bfcl), tiny_bfcl)
    assert res["overall"]["accuracy"] == 1.0 and res["overall"]["n"] == 4
    assert set(res["categories"]) == {"simple_python", "my_parallel", "irrelevance"}
    assert {i["mode"] for i in res["items"]} == {FC, PROMPT}  # tool calls; the irrelevance answer is text
    empty = bfcl.evaluate(lambda m, t: "", tiny_bfcl, categories=["simple", "irrelevance"], limit=1)
    assert empty["categories"]["simple_python"] == {"accuracy": 0.0, "n": 1, "correct": 0, "stderr": 0.0}
    assert empty["categories"]["irrelevance"]["accuracy"] == 1.0
    fenced = bfcl.evaluate(lambda m, t: f"```python\ngeo.distance({NYC})\n```", tiny_bfcl, categories=["simple"],
                           lenient=True)
    assert fenced["categories"]["simple_python"]["accuracy"] == 1.0
    assert fenced["categories"]["simple_python"]["strict_accuracy"] == 0.0 and fenced["strict_macro_accuracy"] == 0.0
    assert all(i["fenced"] and not i["strict_valid"] for i in fenced["items"])
    with pytest.raises(bfcl.BFCLError, match="available"):
        bfcl.evaluate(lambda m, t: "", tiny_bfcl, categories=["nope"])


def test_evaluate_shared_ground_truth_and_nothing():
    data = shared_data("bfcl")
    res = bfcl.evaluate(_ground_truth_generator(data), data, limit=60)
    assert len(res["categories"]) == 7 and res["overall"]["n"] == 7 * 50 + 6 * 10  # javascript has 50 questions
    # BFCL itself rejects a few of its own ground truths (its parallel matching is greedy; Java parse quirks)
    assert all(c["accuracy"] >= 0.9 for c in res["categories"].values()) and res["overall"]["accuracy"] > 0.97
    assert all(res["categories"][c]["accuracy"] == 1.0 for c in ("simple_python", "multiple", "parallel"))
    nothing = bfcl.evaluate(lambda m, t: "", data, limit=30)
    for cat, c in nothing["categories"].items():
        assert c["accuracy"] == (1.0 if cat == "irrelevance" else 0.0), cat


def test_other_formats_skipped_or_refused(tiny_bfcl):
    """A multi-turn file is skipped (with a warning) when all categories run, refused when named."""
    mt = {"id": "multi_turn_base_0", "question": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
          "function": []}
    write_jsonl(tiny_bfcl / "BFCL_v4_multi_turn_base.json", [mt])
    write_jsonl(tiny_bfcl / "possible_answer/BFCL_v4_multi_turn_base.json",
                [{"id": "multi_turn_base_0", "ground_truth": [["cd(folder='x')"], ["ls()"]]}])
    with pytest.warns(UserWarning, match="multi_turn_base"):
        res = bfcl.evaluate(lambda m, t: "", tiny_bfcl)
    assert "multi_turn_base" not in res["categories"]
    with pytest.raises(bfcl.BFCLError, match="single-turn"):
        bfcl.evaluate(lambda m, t: "", tiny_bfcl, categories=["multi_turn_base"])


def test_tools_render_with_chat_template(tiny_tokenizer):
    """BFCL functions as OpenAI tools go through the project's chat template (all three languages)."""
    fns = [FN, {"name": "Foo.bar", "description": "j", "parameters": {"type": "dict", "required": [],
                                                                      "properties": {"xs": {"type": "ArrayList", "items": {"type": "String"}}}}}]
    for cat in ("simple_python", "simple_java", "simple_javascript"):
        tools = to_openai_tools(fns, cat)
        text = tiny_tokenizer.apply_chat_template(Q["question"][0], tools=tools, tokenize=False, add_generation_prompt=True)
        assert "<tools>" in text and '"geo.distance"' in text and '"Foo.bar"' in text and "How far?" in text


def test_evaluate_tiny_model_end_to_end(tmp_path, tiny_tokenizer, tiny_bfcl):
    """evaluate() with a real (random) tiny model generating greedily from the chat-template prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "m", tiny_tokenizer, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def generate(messages, tools):
        prompt = tiny_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        return tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    res = bfcl.evaluate(generate, tiny_bfcl)
    assert res["overall"]["n"] == 4 and len(res["items"]) == 4
    for item in res["items"]:  # each verdict is the checker's verdict on the text the model wrote
        req = next(r for r in bfcl.build_requests(tiny_bfcl) if r["id"] == item["id"])
        assert item["valid"] == bfcl.score(req["question"], req["ground_truth"], item["category"], text=item["text"]).valid
