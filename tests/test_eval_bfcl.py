"""BFCL-style function-calling eval: checker, decoding, the eval-fc CLI and evaluate().

The checker must accept every ground-truth answer of ../shared/data/bfcl (built several ways: first acceptable
values, other acceptable values, optional parameters left out, Java/JavaScript source literals, reordered
parallel calls) and reject systematic corruptions of them. Handcrafted files keep the tests general.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evals import bfcl
from evals.bfcl_checker import check, language_of, normalize_string
from evals.bfcl_decode import DecodeError, convert_java, convert_js, decode_output
from conftest import shared_data

OMIT = ""


# ---------------------------------------------------------------- building predictions from ground truth


def _opts(v):
    return v if isinstance(v, list) else [v]


def pick(options: list, k: int = 0):
    """The k-th acceptable non-"" value (clamped to the last), built recursively for dicts."""
    real = [o for o in _opts(options) if o != OMIT]
    return build(real[min(k, len(real) - 1)], k)


def build(value, k: int = 0):
    if isinstance(value, dict):  # a ground-truth dict maps each key to its acceptable values
        return {key: pick(v, k) for key, v in value.items() if [o for o in _opts(v) if o != OMIT]}
    if isinstance(value, list):
        return [build(e, k) for e in value]
    return value


def spec_of(question: dict, name: str) -> dict:
    return next((f for f in question["function"] if f["name"] == name), {"parameters": {}})


def gt_calls(question: dict, gt: list[dict], k: int = 0, omit_optional: bool = False) -> list[dict]:
    """Predicted calls ({func: {arg: value}}) from a ground truth: the k-th alternative of each value."""
    calls = []
    for call in gt:
        ((name, params),) = call.items()
        required = spec_of(question, name)["parameters"].get("required", [])
        args = {}
        for p, options in params.items():
            if not [o for o in options if o != OMIT]:
                continue
            if omit_optional and OMIT in options and p not in required:
                continue
            args[p] = pick(options, k)
        calls.append({name: args})
    return calls


def to_text(calls: list[dict], syntax: str) -> str:
    """Render calls as raw model output in one of the three syntaxes."""
    flat = [{"name": n, "arguments": a} for c in calls for n, a in c.items()]
    if syntax == "tool_call":
        return "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in flat)
    if syntax == "json":
        return json.dumps(flat if len(flat) > 1 else flat[0])
    return "[" + ", ".join(f"{c['name']}(" + ", ".join(f"{k}={v!r}" for k, v in c["arguments"].items()) + ")"
                           for c in flat) + "]"


# Java / JavaScript source literals of typed values (what a model writes in those categories).

def java_untyped(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "new ArrayList<>(Arrays.asList(" + ", ".join(java_untyped(e) for e in v) + "))"
    if isinstance(v, dict):
        return "new HashMap<String, Object>() {{ " + " ".join(f"put({json.dumps(k)}, {java_untyped(x)});"
                                                               for k, x in v.items()) + " }}"
    return repr(v)


def java_literal(v, schema: dict) -> str:
    tp, item = schema.get("type"), (schema.get("items") or {}).get("type")
    if isinstance(v, str) and tp not in ("String", "char"):
        return v  # a variable name or source text, as the ground truth gives it
    if tp == "long":
        return f"{v}L"
    if tp == "float":
        return f"{v}f"
    if tp == "char" and isinstance(v, str):
        return f"'{v}'"
    if tp in ("Array", "ArrayList") and isinstance(v, list):
        elems = [java_literal(e, {"type": item}) if item not in (None, "any") else java_untyped(e) for e in v]
        if tp == "Array":
            return "new " + {"String": "String", "integer": "int"}.get(item, "Object") + "[]{" + ", ".join(elems) + "}"
        return "new ArrayList<>(Arrays.asList(" + ", ".join(elems) + "))"
    return java_untyped(v)


def js_untyped(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(js_untyped(e) for e in v) + "]"
    return "{" + ", ".join(f"{k}: {js_untyped(x)}" for k, x in v.items()) + "}"


def js_literal(v, schema: dict) -> str:
    tp = schema.get("type")
    if isinstance(v, str) and tp != "String":
        return v
    if tp == "Bigint":
        return f"{v}n"
    if tp == "String" and isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return js_untyped(v)


def source_literal_calls(question: dict, calls: list[dict], category: str) -> list[dict]:
    """The same calls with every argument as a Java/JavaScript source string."""
    render = java_literal if language_of(category) == "java" else js_literal
    out = []
    for call in calls:
        ((name, args),) = call.items()
        props = spec_of(question, name)["parameters"].get("properties", {})
        out.append({name: {p: render(v, props.get(p, {})) for p, v in args.items()}})
    return out


@pytest.fixture(scope="module")
def shared_bfcl():
    """{category: [(question, ground truth)]} for the shared data (ground truth None for irrelevance)."""
    root = shared_data("bfcl")
    questions, answers = bfcl.load_questions(root), bfcl.load_answers(None, root)
    out: dict[str, list] = {}
    for qid, (cat, q) in questions.items():
        out.setdefault(cat, []).append((q, answers.get(qid)))
    return out


def acceptance(items, category, make) -> tuple[int, int]:
    ok = sum(bfcl.score(q, gt, category, calls=make(q, gt)).valid for q, gt in items)
    return ok, len(items)


# ---------------------------------------------------------------- shared ground truth: acceptance


def test_shared_ground_truth_accepted_every_way(shared_bfcl):
    """Every ground truth, as first / second / last alternatives, and with optional parameters left out."""
    assert {"simple_python", "multiple", "parallel", "parallel_multiple", "simple_java", "simple_javascript"} <= set(shared_bfcl)
    for cat, items in shared_bfcl.items():
        if "irrelevance" in cat:
            continue
        for label, make in [("first", lambda q, gt: gt_calls(q, gt, 0)), ("second", lambda q, gt: gt_calls(q, gt, 1)),
                            ("last", lambda q, gt: gt_calls(q, gt, 99)),
                            ("omit-optional", lambda q, gt: gt_calls(q, gt, 0, omit_optional=True))]:
            failures = [(q["id"], bfcl.score(q, gt, cat, calls=make(q, gt)).error) for q, gt in items
                        if not bfcl.score(q, gt, cat, calls=make(q, gt)).valid]
            assert not failures, f"{cat} ({label}): {len(failures)} rejected, e.g. {failures[:3]}"


def test_shared_ground_truth_accepted_as_raw_text(shared_bfcl):
    """The same answers through the decoder, in all three output syntaxes; reordered parallel calls too."""
    for cat, items in shared_bfcl.items():
        if "irrelevance" in cat:
            continue
        for syntax in ("tool_call", "json", "python"):
            bad = [q["id"] for q, gt in items if not bfcl.score(q, gt, cat, text=to_text(gt_calls(q, gt), syntax)).valid]
            assert not bad, f"{cat} as {syntax}: rejected {bad[:5]}"
        multi = [(q, gt) for q, gt in items if len(gt) > 1]
        bad = [q["id"] for q, gt in multi if not bfcl.score(q, gt, cat, calls=gt_calls(q, gt)[::-1]).valid]
        assert not bad, f"{cat}: reordered parallel calls rejected {bad[:5]}"


def test_shared_java_javascript_source_literals(shared_bfcl):
    """Java/JavaScript answers written as source literals are converted by their declared types."""
    for cat in ("simple_java", "simple_javascript"):
        items = shared_bfcl[cat]
        bad = []
        for q, gt in items:
            calls = source_literal_calls(q, gt_calls(q, gt), cat)
            v = bfcl.score(q, gt, cat, calls=calls)
            if not v.valid:
                bad.append((q["id"], calls, v.error))
        assert not bad, f"{cat}: {len(bad)}/{len(items)} rejected, e.g. {bad[:2]}"


def test_shared_irrelevance(shared_bfcl):
    for q, gt in shared_bfcl["irrelevance"]:
        assert bfcl.score(q, gt, "irrelevance", text="I cannot answer that with the tools I have.").valid
        call = {q["function"][0]["name"]: {}}
        assert not bfcl.score(q, gt, "irrelevance", calls=[call]).valid


# ---------------------------------------------------------------- shared ground truth: corruptions

WRONG_VALUES = [12345, "zzqx_wrong_type", [987654], {"zzqx": 1}, 3.25, True]


def corruptions(q: dict, gt: list[dict], category: str, rng: random.Random) -> dict[str, list[dict]]:
    """Systematic corruptions of the first-choice answer; each must be rejected."""
    calls = gt_calls(q, gt)
    lang = language_of(category)
    types = __import__("evals.bfcl_checker", fromlist=["TYPES"]).TYPES[lang]
    out: dict[str, list[dict]] = {}
    i = rng.randrange(len(calls))
    ((name, args),) = calls[i].items()
    ((_, gt_params),) = gt[i].items()
    spec = spec_of(q, name)["parameters"]
    names = {f["name"] for f in q["function"]} | {f["name"].replace(".", "_") for f in q["function"]}

    def replaced(new_call):
        return calls[:i] + [new_call] + calls[i + 1:]

    out["wrong_name"] = replaced({name + "_zz" if name + "_zz" not in names else name + "_zq": args})
    present_required = [p for p in spec.get("required", []) if p in args]
    if present_required:
        p = rng.choice(present_required)
        out["missing_required"] = replaced({name: {k: v for k, v in args.items() if k != p}})
    out["extra_param"] = replaced({name: {**args, "zzqx_extra": 1}})
    typed = [p for p in args if spec.get("properties", {}).get(p, {}).get("type") in types]
    if typed:
        p = rng.choice(typed)
        expected = types[spec["properties"][p]["type"]]
        seen = {type(o) for o in gt_params[p] if o != OMIT} | {expected} | ({int} if expected is float else set())
        wrong = next(w for w in WRONG_VALUES if type(w) not in seen)
        out["wrong_type"] = replaced({name: {**args, p: wrong}})
    if args:
        p = rng.choice(sorted(args))
        out["value_outside"] = replaced({name: {**args, p: outside_value(args[p], gt_params[p])}})
    if len(calls) > 1:
        out["missing_call"] = calls[:i] + calls[i + 1:]
    out["extra_call"] = calls + [calls[i]]
    return out


def outside_value(v, options):
    """A value of the same type as ``v`` that is not acceptable."""
    if isinstance(v, bool):
        return not v if (not v) not in [o for o in options if isinstance(o, bool)] else "zzqx"
    if isinstance(v, (int, float)):
        return v + 7919
    if isinstance(v, str):
        return v + " zzqx"
    if isinstance(v, list):
        return v + [v[-1] if v else "zzqx"]
    return {**v, "zzqx_key": 1}


def test_shared_corruptions_rejected(shared_bfcl, capsys):
    rng = random.Random(0)
    rates: dict[str, list[int]] = {}
    for cat, items in shared_bfcl.items():
        if "irrelevance" in cat:
            continue
        for q, gt in items:
            for kind, calls in corruptions(q, gt, cat, rng).items():
                v = bfcl.score(q, gt, cat, calls=calls)
                r = rates.setdefault(kind, [0, 0])
                r[0] += not v.valid
                r[1] += 1
                assert not v.valid, f"{cat} {q['id']}: corruption {kind} accepted: {calls}"
                if language_of(cat) != "python":  # the same corruption written as Java/JavaScript source
                    src = source_literal_calls(q, calls, cat)
                    assert not bfcl.score(q, gt, cat, calls=src).valid, f"{cat} {q['id']}: {kind} accepted: {src}"
    assert set(rates) >= {"wrong_name", "missing_required", "extra_param", "wrong_type", "value_outside", "missing_call"}
    with capsys.disabled():
        print("\nrejection rates:", {k: f"{a}/{n}" for k, (a, n) in sorted(rates.items())})


# ---------------------------------------------------------------- handcrafted rules

FN = {"name": "geo.distance", "description": "Distance between two cities.", "parameters": {
    "type": "dict", "required": ["origin", "destination"], "properties": {
        "origin": {"type": "string", "description": "start"}, "destination": {"type": "string", "description": "end"},
        "unit": {"type": "string", "description": "km or mi"}, "precision": {"type": "float", "description": "p"},
        "stops": {"type": "array", "items": {"type": "integer"}, "description": "s"},
        "opts": {"type": "dict", "description": "o", "properties": {"fast": {"type": "boolean"}}}}}}
Q = {"id": "custom_0", "question": [[{"role": "user", "content": "How far?"}]], "function": [FN]}
GT = [{"geo.distance": {"origin": ["New York, NY", "NYC"], "destination": ["Boston"], "unit": ["km", ""],
                        "precision": [1.0, ""], "stops": [[1, 2], ""], "opts": [{"fast": [True, ""]}, ""]}}]


@pytest.mark.parametrize("args, valid", [
    ({"origin": "new york ny", "destination": "BOSTON"}, True),  # normalisation: case, punctuation, spaces
    ({"origin": "NYC", "destination": "Boston", "unit": "km"}, True),
    ({"origin": "NYC", "destination": "Boston", "precision": 1}, True),  # int accepted for float
    ({"origin": "NYC", "destination": "Boston", "stops": [1, 2], "opts": {}}, True),  # dict key may be omitted
    ({"origin": "NYC", "destination": "Boston", "opts": {"fast": True}}, True),
    ({"origin": "NYC", "destination": "Boston", "opts": {"fast": 1}}, False),  # bool is strict
    ({"origin": "NYC", "destination": "Boston", "opts": {"slow": True}}, False),  # unexpected dict key
    ({"origin": "NYC", "destination": "Boston", "stops": [2, 1]}, False),  # list order matters
    ({"origin": "NYC", "destination": "Boston", "stops": [1.0, 2]}, False),  # element type
    ({"origin": "NYC", "destination": "Boston", "unit": "mi"}, False),
    ({"origin": "NYC", "destination": "Boston", "unit": "", "stops": []}, True),  # explicit "" / [] = left out (BFCL)
    ({"origin": "NYC", "destination": "Boston", "precision": ""}, False),  # but "" is no float
    ({"origin": "New\tYork NY", "destination": "Boston"}, False),  # only spaces are ignored, as BFCL
    ({"origin": "NYC", "destination": "Boston", "precision": "1.0"}, False),  # wrong type
    ({"origin": "NYC"}, False),  # missing required
    ({"origin": "NYC", "destination": "Boston", "zz": 1}, False),  # unexpected parameter
])
def test_handcrafted_rules(args, valid):
    for name in ("geo.distance", "geo_distance"):  # dots may come back as underscores
        v = check(Q, GT, [{"name": name, "arguments": args}], "custom")
        assert v.valid is valid, v


def test_required_optional_and_only_omit():
    gt = [{"f": {"a": [1], "b": [""]}}]
    q = {"id": "x_0", "function": [{"name": "f", "parameters": {"type": "dict", "required": ["a"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}]}
    assert check(q, gt, [{"name": "f", "arguments": {"a": 1}}], "simple").valid
    assert not check(q, gt, [{"name": "f", "arguments": {"a": 1, "b": 2}}], "simple").valid
    assert not check(q, gt, [{"name": "f", "arguments": {"a": True}}], "simple").valid  # bool is not int
    gt2 = [{"f": {"a": [1], "b": [2]}}]
    v = check(q, gt2, [{"name": "f", "arguments": {"a": 1}}], "simple")
    assert not v.valid and "b" in v.error  # not required by the schema, but the answer needs it


def test_parallel_matching_is_one_to_one_and_not_greedy():
    q = {"id": "p_0", "function": [{"name": "f", "parameters": {"type": "dict", "properties": {
        "x": {"type": "integer"}}, "required": []}}]}
    gt = [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]  # greedy in ground-truth order would pair x=1 with the first
    assert check(q, gt, [{"name": "f", "arguments": {"x": 1}}, {"name": "f", "arguments": {"x": 2}}], "parallel").valid
    assert check(q, gt, [{"name": "f", "arguments": {"x": 2}}, {"name": "f", "arguments": {"x": 1}}], "parallel").valid
    assert check(q, gt, [{"name": "f", "arguments": {"x": 1}}] * 2, "parallel").valid  # x=1 fits both
    assert not check(q, gt, [{"name": "f", "arguments": {"x": 2}}] * 2, "parallel").valid  # one-to-one
    assert not check(q, gt, [{"name": "f", "arguments": {"x": 1}}], "parallel").valid


def test_variable_rule_and_relevance():
    """A ground truth of another type than declared (a variable name) accepts that type; relevance wants a call."""
    q = {"id": "v_0", "function": [{"name": "f", "parameters": {"type": "dict", "properties": {
        "data": {"type": "array", "items": {"type": "integer"}}}, "required": ["data"]}}]}
    gt = [{"f": {"data": ["my_list"]}}]
    assert check(q, gt, [{"name": "f", "arguments": {"data": "my_list"}}], "simple").valid
    assert not check(q, gt, [{"name": "f", "arguments": {"data": 3}}], "simple").valid
    assert check(q, None, [{"name": "f", "arguments": {}}], "live_relevance").valid
    assert not check(q, None, [], "live_relevance").valid
    assert check(q, None, None, "live_irrelevance", decode_error="bad json").valid


def test_normalize_string():
    assert normalize_string("April 1, 2024") == normalize_string("april 1 2024") == normalize_string("April-1,2024")
    assert normalize_string("it's") == 'it"s'


# ---------------------------------------------------------------- Java / JavaScript conversion


@pytest.mark.parametrize("src, tp, item, want", [
    ("true", "boolean", None, True), ("42", "integer", None, 42), ("42L", "long", None, 42), ("42", "long", None, 42),
    ("3.5f", "float", None, 3.5), ("0.5", "double", None, 0.5), ("'c'", "char", None, "c"), ('"abc"', "String", None, "abc"),
    ("abc", "String", None, "abc"), ("myVar", "any", None, "myVar"),
    ("new int[]{1, 2, 3}", "Array", "integer", [1, 2, 3]), ('new String[]{"a", "b"}', "Array", "String", ["a", "b"]),
    ('new ArrayList<>(Arrays.asList("x", "y"))', "ArrayList", "String", ["x", "y"]),
    ("new ArrayList<Long>(Arrays.asList(1L, 2L))", "ArrayList", "long", [1, 2]),
    ("Arrays.asList(1, 2)", "ArrayList", None, [1, 2]), ("new ArrayList<>()", "ArrayList", None, []),
    ("new ArrayList<String>() {{ add(\"a\"); add(\"b\"); }}", "ArrayList", "String", ["a", "b"]),
    ('new HashMap<String, Object>() {{ put("limit", 50); put("s", "public"); }}', "HashMap", None, {"limit": 50, "s": "public"}),
    ('Map.of("a", 1, "b", true)', "HashMap", None, {"a": 1, "b": True}), ("new HashMap<>()", "HashMap", None, {}),
    ("docFields", "HashMap", None, "docFields"), ("yes", "boolean", None, "yes"), ("1.5", "integer", None, "1.5"),
])
def test_convert_java(src, tp, item, want):
    got = convert_java(src, tp, item)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("src, tp, item, want", [
    ("'abc'", "String", None, "abc"), ('"a, b"', "String", None, "a, b"), ("true", "Boolean", None, True),
    ("12", "integer", None, 12), ("4.0", "float", None, 4.0), ("4", "float", None, 4.0), ("123n", "Bigint", None, 123),
    ("[1, 2, 3]", "array", "integer", [1, 2, 3]), ("['a', \"b\"]", "array", "String", ["a", "b"]),
    ("new Array(1.5, 2)", "array", "float", [1.5, 2.0]), ("[[1, 2], [3]]", "array", None, [[1, 2], [3]]),
    ("{method: 'GET', retries: 3, deep: {on: true}, list: ['x']}", "dict", None,
     {"method": "GET", "retries": 3, "deep": {"on": True}, "list": ["x"]}),
    ("{'a': [1, 2]}", "dict", None, {"a": [1, 2]}), ("responseData", "dict", None, "responseData"),
    ("React.createContext()", "any", None, "React.createContext()"),
])
def test_convert_js(src, tp, item, want):
    got = convert_js(src, tp, item)
    assert got == want and type(got) is type(want)


def test_java_category_checks_declared_types():
    q = {"id": "simple_java_x", "function": [{"name": "A.b", "parameters": {"type": "dict", "required": ["n", "on"],
         "properties": {"n": {"type": "long"}, "on": {"type": "boolean"}, "xs": {"type": "ArrayList", "items": {"type": "String"}}}}}]}
    gt = [{"A.b": {"n": [5], "on": [False], "xs": [["a b"], ""]}}]
    ok = {"n": "5L", "on": "false", "xs": 'new ArrayList<>(Arrays.asList("A B"))'}
    assert check(q, gt, [{"name": "A.b", "arguments": ok}], "simple_java").valid
    assert check(q, gt, [{"name": "A_b", "arguments": {"n": 5, "on": False}}], "simple_java").valid  # JSON-typed
    assert not check(q, gt, [{"name": "A.b", "arguments": {**ok, "on": "no"}}], "simple_java").valid
    assert not check(q, gt, [{"name": "A.b", "arguments": {**ok, "n": "6L"}}], "simple_java").valid


# ---------------------------------------------------------------- decoding


def test_decode_three_syntaxes():
    one = [{"name": "math.factorial", "arguments": {"n": 5}}]
    two = one + [{"name": "g", "arguments": {"s": "x", "l": [1, 2], "d": {"k": True}}}]
    assert decode_output('<tool_call>\n{"name": "math.factorial", "arguments": {"n": 5}}\n</tool_call><|im_end|>') == one
    assert decode_output('{"name": "math.factorial", "arguments": {"n": 5}}') == one
    assert decode_output('{"name": "math.factorial", "arguments": "{\\"n\\": 5}"}') == one  # OpenAI string args
    assert decode_output('[{"type": "function", "function": {"name": "math.factorial", "arguments": {"n": 5}}}]') == one
    assert decode_output('[{"math.factorial": {"n": 5}}]') == one  # BFCL's shape
    assert decode_output("math.factorial(n=5)") == one
    assert decode_output('```python\n[math.factorial(n=5), g(s="x", l=(1, 2), d={"k": True})]\n```') == two
    assert decode_output('Sure, here it is:\n```json\n{"name": "math.factorial", "arguments": {"n": 5}}\n```\nDone.') == one
    assert decode_output("f(x=my_var, y=np.pi * 2)") == [{"name": "f", "arguments": {"x": "my_var", "y": "np.pi * 2"}}]


def test_decode_no_call_and_errors():
    assert decode_output("") == decode_output(None) == []
    assert decode_output("The capital of France is Paris.") == []
    assert decode_output("[]") == []
    for bad in ("<tool_call>{not json</tool_call>", "f(1, 2)", '{"name": "f", "arguments": [1]}', "f(a=1", "[1, 2]"):
        with pytest.raises(DecodeError):
            decode_output(bad)


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
        {"id": "custom_0", "text": '<tool_call>{"name": "geo.distance", "arguments": {"origin": "NYC", "destination": "Boston"}}</tool_call>'},
        {"id": "custom_0", "calls": [{"geo.distance": {"origin": "LA", "destination": "Boston"}}]},  # same id again
        {"id": "irrelevance_0", "text": "Hello!"},
        {"id": "my_parallel_0", "text": "weather(city='A')"},
        {"id": "custom_0", "calls": [{"name": "geo_distance", "arguments": {"origin": "NYC", "destination": "boston"}}]},
    ])
    verdicts = tmp_path / "v.jsonl"
    res = run_cli("--questions", str(tiny_bfcl), "--predictions", str(preds), "--verdicts", str(verdicts))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout holds only the JSON (logs go to stderr)
    v = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert [x["id"] for x in v] == ["my_parallel_0", "custom_0", "custom_0", "irrelevance_0", "my_parallel_0", "custom_0"]
    assert [x["valid"] for x in v] == [True, True, False, True, False, True]
    assert all(x["error"] for x in v if not x["valid"])
    cats = summary["categories"]
    assert cats["simple_python"]["n"] == 3 and cats["simple_python"]["correct"] == 2
    assert cats["my_parallel"]["accuracy"] == 0.5 and cats["irrelevance"]["accuracy"] == 1.0
    assert summary["overall"]["n"] == 6 and summary["overall"]["correct"] == 4


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


def test_category_names():
    assert bfcl.category_of_file("BFCL_v4_parallel_multiple.json") == "parallel_multiple"
    assert bfcl.category_of_file("BFCL_v3_live_simple.json") == "live_simple"
    assert bfcl.category_of_id("simple_java_12") == "simple_java"
    assert bfcl.category_of_id("live_simple_19-3-15") == "live_simple"


def test_openai_tools():
    (tool,) = bfcl.to_openai_tools([FN], "simple_python")
    f = tool["function"]
    assert tool["type"] == "function" and f["name"] == "geo.distance" and f["parameters"]["type"] == "object"
    assert f["parameters"]["properties"]["opts"]["type"] == "object"
    assert f["parameters"]["properties"]["precision"]["type"] == "number"
    assert f["parameters"]["properties"]["opts"]["properties"]["fast"]["type"] == "boolean"
    assert FN["parameters"]["type"] == "dict"  # the input is not modified
    assert f["description"].endswith("Python 3 syntax.") and "float type" in f["parameters"]["properties"]["precision"]["description"]
    (plain,) = bfcl.to_openai_tools([FN], "simple_python", hints=False)
    assert plain["function"]["description"] == FN["description"] and "format" not in plain["function"]["parameters"]["properties"]["precision"]
    (jt,) = bfcl.to_openai_tools([FN], "simple_java", underscore_names=True)
    assert jt["function"]["name"] == "geo_distance"
    assert all(p["type"] == "string" for p in jt["function"]["parameters"]["properties"].values())
    assert "Java float type" in jt["function"]["parameters"]["properties"]["precision"]["description"]


def _ground_truth_generator(data_dir: Path, syntax: str = "tool_call"):
    """A real generate_fn that answers each question with its ground truth (no call for irrelevance)."""
    answers = bfcl.load_answers(None, data_dir)
    by_prompt = {}
    for qid, (_, q) in bfcl.load_questions(data_dir).items():
        key = json.dumps(q["question"][0], sort_keys=True)
        gt = answers.get(qid)
        by_prompt[key] = "I can't do that." if gt is None else to_text(gt_calls(q, gt), syntax)

    def generate(messages, tools):
        assert tools and all(t["type"] == "function" for t in tools)
        return by_prompt[json.dumps(messages, sort_keys=True)]

    return generate


def test_evaluate_tiny(tiny_bfcl):
    res = bfcl.evaluate(_ground_truth_generator(tiny_bfcl), tiny_bfcl)
    assert res["overall"]["accuracy"] == 1.0 and res["overall"]["n"] == 4
    assert set(res["categories"]) == {"simple_python", "my_parallel", "irrelevance"}
    empty = bfcl.evaluate(lambda m, t: "", tiny_bfcl, categories=["simple", "irrelevance"], limit=1)
    assert empty["categories"]["simple_python"] == {"accuracy": 0.0, "n": 1, "correct": 0, "stderr": 0.0}
    assert empty["categories"]["irrelevance"]["accuracy"] == 1.0
    with pytest.raises(bfcl.BFCLError, match="available"):
        bfcl.evaluate(lambda m, t: "", tiny_bfcl, categories=["nope"])


def test_evaluate_shared_ground_truth_and_nothing():
    data = shared_data("bfcl")
    res = bfcl.evaluate(_ground_truth_generator(data, "python"), data, limit=60)
    assert all(c["accuracy"] == 1.0 for c in res["categories"].values()), res["categories"]
    assert len(res["categories"]) == 7 and res["overall"]["n"] == 7 * 50 + 6 * 10  # javascript has 50 questions
    item = res["items"][0]
    assert set(item) >= {"id", "category", "text", "valid", "error"}
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
    v = check(mt, [["ls()"]], [{"name": "ls", "arguments": {}}], "multi_turn_base")
    assert not v.valid and "not AST-checked" in v.error


def test_decode_json_lines_and_keyword_names():
    text = '{"name": "f", "arguments": {"a": 1}}\n{"name": "g", "arguments": {}}'
    assert [c["name"] for c in decode_output(text)] == ["f", "g"]
    assert decode_output("q(from=1, to='x', klass=True)") == [{"name": "q", "arguments": {"from": 1, "to": "x", "klass": True}}]


def test_tools_render_with_chat_template(tiny_tokenizer):
    """BFCL functions as OpenAI tools go through the project's chat template (all three languages)."""
    fns = [FN, {"name": "Foo.bar", "description": "j", "parameters": {"type": "dict", "required": [],
                                                                      "properties": {"xs": {"type": "ArrayList", "items": {"type": "String"}}}}}]
    for cat in ("simple_python", "simple_java", "simple_javascript"):
        tools = bfcl.to_openai_tools(fns, cat)
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


def test_cli_category_from_id_prefix(tmp_path):
    """Files not named BFCL_v4_<category>.json: the category comes from the id prefix."""
    q = write_jsonl(tmp_path / "questions.jsonl", [{**Q, "id": "live_multiple_7-2-1"}])
    a = write_jsonl(tmp_path / "answers.jsonl", [{"id": "live_multiple_7-2-1", "ground_truth": GT}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "live_multiple_7-2-1", "text": "geo.distance(origin='NYC', destination='Boston')"}])
    res = run_cli("--questions", str(q), "--answers", str(a), "--predictions", str(preds))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["categories"] == {"live_multiple": {"accuracy": 1.0, "n": 1, "correct": 1, "stderr": 0.0}}
