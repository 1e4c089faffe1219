"""Agreement of the project's BFCL scoring with upstream BFCL's, per category (target: at least 99.5%).

For every question of a BFCL data directory, replies are built from upstream's ground truth and from
systematic corruptions of it (``KINDS``), each written the ways a model answers (``STYLES``): tool calls in the
chat format's ``<tool_call>`` text (the harness's path), the same calls as OpenAI ``tool_calls`` (``minitron
eval-fc``'s ``calls``), tool calls with dots written as underscores, and calls written as text (BFCL's prompt
mode), python-fenced or with underscored names too. Java and JavaScript values are written as source literals.
Each reply is scored twice:

* **project**: ``evals.bfcl.score`` (the project's decoding, then BFCL's checker);
* **upstream**: BFCL's own pipeline for one entry, without the project's decoding: the FC branch of
  ``OpenAICompletionsHandler.decode_ast`` on the OpenAI tool calls, or ``default_decode_ast_prompting`` on the
  text, then ``eval_runner._evaluate_single_ast_entry`` / ``_evaluate_single_relevance_entry``'s steps. An FC
  reply is checked with the model config that offered its spelling of the names: dotted names as a model shown
  dotted tools (BFCL's Qwen FC handlers, ``underscore_to_dot=False``), underscored names as one shown OpenAI's
  underscored tools (``underscore_to_dot=True``); prompt mode uses ``underscore_to_dot=False``.

Lenient decoding (``--lenient``) is measured apart: how many python-fenced ground truths it accepts.
By design the project accepts both spellings of a dotted name in FC mode whichever was offered (a server or chat
template may rename tools); BFCL would reject a dotted name from a model it showed underscored tools. That case
is not generated.

Usage::

    python -m evals.bfcl_agreement [DIR ...] [--limit N] [--out agreement.json]

Without DIRs: the demo world's ``runs/demo/world/bfcl``, ``../shared/data/bfcl`` (each when present) and the
single-turn categories of bfcl-eval's own data that ``../shared/data`` lacks (BFCL's live categories).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from evals import bfcl
from evals.bfcl_checker import is_relevance
from evals.bfcl_upstream import FC_MODEL, PROMPT_MODEL, language, return_format, upstream
from minitron.tool_schema import language_of

TARGET = 0.995
OMIT = ""  # BFCL's "may be left out" value
KINDS = ("ground_truth", "alternative", "wrong_value", "missing_required", "wrong_type", "wrong_name", "extra_call",
         "extra_param", "missing_call", "typed_values")  # typed_values: Java/JavaScript values as JSON, not source
STYLES = ("fc_text", "fc_calls", "fc_underscore", "prompt", "prompt_fenced", "prompt_underscore")
WRONG_VALUES = [12345, "zzqx_wrong_type", [987654], {"zzqx": 1}, 3.25, True]


@dataclasses.dataclass
class Reply:
    """One reply, as the project gets it (``text`` or ``calls``) and as upstream's pipeline gets it."""

    kind: str
    style: str
    text: str | None = None  # the raw reply (the project's input unless ``calls``)
    calls: list[dict] | None = None  # OpenAI tool calls: the project's input for fc_calls, upstream's for FC
    underscored: bool = False  # FC names written with "_" for "." (a model shown OpenAI's underscored tools)

    @property
    def fc(self) -> bool:
        return self.style.startswith("fc")


# ---------------------------------------------------------------- answers from the ground truth


def _real(options: Any) -> list:
    return [o for o in (options if isinstance(options, list) else [options]) if o != OMIT]


def _pick(options: Any, k: int) -> Any:
    """The k-th acceptable value (clamped), dicts built recursively (each key maps to its acceptable values)."""
    real = _real(options)
    value = real[min(k, len(real) - 1)]
    if isinstance(value, dict):
        return {key: _pick(v, k) for key, v in value.items() if _real(v)}
    if isinstance(value, list):
        return [{key: _pick(v, k) for key, v in e.items() if _real(v)} if isinstance(e, dict) else e for e in value]
    return value


def _spec(question: dict, name: str) -> dict:
    return next((f for f in question["function"] if f["name"] == name), {}).get("parameters") or {}


def answer(question: dict, gt: list[dict], k: int = 0, omit_optional: bool = False) -> list[tuple[str, dict]]:
    """A correct answer ``[(name, {param: value})]``: the k-th acceptable value of each parameter."""
    calls = []
    for call in gt:
        ((name, params),) = call.items()
        required = _spec(question, name).get("required") or []
        args = {p: _pick(opts, k) for p, opts in params.items()
                if _real(opts) and not (omit_optional and OMIT in opts and p not in required)}
        calls.append((name, args))
    return calls


def _outside(value: Any, options: list) -> Any:
    """A value of the same type that is not acceptable."""
    if isinstance(value, bool):
        return (not value) if (not value) not in [o for o in options if isinstance(o, bool)] else "zzqx"
    if isinstance(value, (int, float)):
        return value + 7919
    if isinstance(value, str):
        return value + " zzqx"
    if isinstance(value, list):
        return value + [value[-1] if value else "zzqx"]
    if isinstance(value, dict):
        return {**value, "zzqx_key": 1}
    return "zzqx"  # None (BFCL's live data accepts null for some parameters)


def corruptions(question: dict, gt: list[dict], category: str, rng: random.Random) -> dict[str, list[tuple[str, dict]]]:
    """The correct answers and systematic corruptions of the first one, by kind (``KINDS``)."""
    calls = answer(question, gt)
    out = {"ground_truth": calls, "alternative": answer(question, gt, 99, omit_optional=True)}
    i = rng.randrange(len(calls))
    name, args = calls[i]
    gt_params = gt[i][name]
    spec = _spec(question, name)
    offered = {f["name"] for f in question["function"]} | {f["name"].replace(".", "_") for f in question["function"]}

    def replaced(new: tuple[str, dict]) -> list[tuple[str, dict]]:
        return calls[:i] + [new] + calls[i + 1:]

    if args:
        p = rng.choice(sorted(args))
        out["wrong_value"] = replaced((name, {**args, p: _outside(args[p], gt_params[p])}))
        seen = {type(o) for o in _real(gt_params[p])} | {type(args[p])}
        out["wrong_type"] = replaced((name, {**args, p: next(w for w in WRONG_VALUES if type(w) not in seen)}))
    present = [p for p in spec.get("required") or [] if p in args]
    if present:
        p = rng.choice(present)
        out["missing_required"] = replaced((name, {k: v for k, v in args.items() if k != p}))
    out["wrong_name"] = replaced((next(n for n in (name + "_zz", name + "_zq") if n not in offered), args))
    out["extra_call"] = calls + [calls[i]]
    out["extra_param"] = replaced((name, {**args, "zzqx_extra": 1}))
    if len(calls) > 1:
        out["missing_call"] = calls[:i] + calls[i + 1:]
    if language_of(category) != "python" and calls != [(n, {}) for n, _ in calls]:
        out["typed_values"] = calls  # BFCL's FC mode wants Java/JavaScript values as source strings
    return out


# ---------------------------------------------------------------- writing answers as a model would


def _java(value: Any, tp: str | None, item: str | None = None, prompt: bool = False) -> str:
    """A value as Java source of its declared type (strings bare in FC arguments, quoted in prompt text)."""
    if isinstance(value, str) and tp not in ("String", "char"):
        return value  # a variable name or an expression, as the ground truth writes it
    if isinstance(value, bool):
        return "true" if value else "false"
    if tp in ("String", "char") and isinstance(value, str):
        return json.dumps(value) if prompt else value
    if tp == "long" and isinstance(value, int):
        return f"{value}L"
    if tp == "float" and isinstance(value, (int, float)):
        return f"{float(value)}f"
    if isinstance(value, list):
        if tp == "Array":
            elems = [_java(e, item, None, prompt=False) if not isinstance(e, str) else e for e in value]
            java_type = {"integer": "int", "String": "String"}.get(item or "", "Object")
            return f"new {java_type}[]{{" + ", ".join(elems) + "}"
        return "new ArrayList<>(Arrays.asList(" + ", ".join(_java(e, item, None, prompt=True) for e in value) + "))"
    if isinstance(value, dict):
        puts = " ".join(f"put({json.dumps(k)}, {_java(v, 'String' if isinstance(v, str) else None, prompt=True)});"
                        for k, v in value.items())
        return "new HashMap<String, Object>() {{ " + puts + " }}"
    return repr(value)


def _js(value: Any, tp: str | None, prompt: bool = False) -> str:
    """A value as JavaScript source of its declared type."""
    if isinstance(value, str):
        return json.dumps(value) if prompt and tp == "String" else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if tp == "Bigint" and isinstance(value, int):
        return f"{value}n"
    if isinstance(value, list):
        return "[" + ", ".join(_js(e, "String" if isinstance(e, str) else None, prompt=True) for e in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_js(v, 'String' if isinstance(v, str) else None, prompt=True)}"
                               for k, v in value.items()) + "}"
    return json.dumps(value)


def source_values(question: dict, calls: list[tuple[str, dict]], category: str, prompt: bool) -> list[tuple[str, dict]]:
    """Java/JavaScript arguments as source strings (what those categories pass); Python ones unchanged."""
    lang = language_of(category)
    if lang == "python":
        return calls
    out = []
    for name, args in calls:
        props = _spec(question, name).get("properties") or {}
        conv = {}
        for p, v in args.items():
            tp = (props.get(p) or {}).get("type")
            item = ((props.get(p) or {}).get("items") or {}).get("type")
            conv[p] = _java(v, tp, item, prompt) if lang == "java" else _js(v, tp, prompt)
        out.append((name, conv))
    return out


def _prompt_text(calls: list[tuple[str, dict]], category: str) -> str:
    """``[f(a=1), g(b='x')]``: Python literals, or the Java/JavaScript source strings written bare."""
    python = language_of(category) == "python"
    return "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={v!r}" if python else f"{k}={v}" for k, v in a.items()) + ")"
                           for n, a in calls) + "]"


def replies(question: dict, kind: str, calls: list[tuple[str, dict]], category: str) -> Iterator[Reply]:
    """One answer written in each style (``STYLES``); fenced and underscored variants for correct answers only."""
    dotted = any("." in n for n, _ in calls)
    fc_calls = calls if kind == "typed_values" else source_values(question, calls, category, prompt=False)
    for style in ("fc_text", "fc_calls", "fc_underscore"):
        if style == "fc_underscore" and not dotted:
            continue
        named = [(n.replace(".", "_") if style == "fc_underscore" else n, a) for n, a in fc_calls]
        tool_calls = [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in named]
        text = "".join(f'<tool_call>{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}'
                       "</tool_call>" for c in tool_calls)  # as evals.generate renders a server's tool calls
        yield Reply(kind, style, text=text, calls=tool_calls, underscored=style == "fc_underscore")
    if kind == "typed_values":
        return
    prompt = _prompt_text(source_values(question, calls, category, prompt=True), category)
    yield Reply(kind, "prompt", text=prompt)
    if kind in ("ground_truth", "alternative"):
        yield Reply(kind, "prompt_fenced", text=f"```python\n{prompt}\n```")
        if dotted:
            under = [(n.replace(".", "_"), a) for n, a in source_values(question, calls, category, prompt=True)]
            yield Reply(kind, "prompt_underscore", text=_prompt_text(under, category))


def no_call_replies(question: dict) -> Iterator[Reply]:
    """Replies to (ir)relevance questions: prose, nothing, and a call in each style."""
    name = question["function"][0]["name"] if question["function"] else "get_weather"  # some offer no tool
    yield Reply("no_call", "prompt", text="I cannot answer that with the tools I have.")
    yield Reply("no_call", "prompt", text="")
    yield Reply("no_call", "prompt", text="[]")
    call = [{"type": "function", "function": {"name": name, "arguments": "{}"}}]
    yield Reply("call", "fc_text", text=f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>', calls=call)
    yield Reply("call", "fc_calls", calls=call)
    yield Reply("call", "prompt", text=f"{name}()")
    yield Reply("call", "prompt_fenced", text=f"```python\n{name}()\n```")


# ---------------------------------------------------------------- the two verdicts


def project_verdict(question: dict, gt: list | None, category: str, reply: Reply, lenient: bool = False) -> bool:
    """The project's path: ``evals.bfcl.score`` on what the harness (text) or eval-fc (calls) would get."""
    if reply.style == "fc_calls":
        return bfcl.score(question, gt, category, calls=reply.calls, lenient=lenient).valid
    return bfcl.score(question, gt, category, text=reply.text, lenient=lenient).valid


def upstream_verdict(question: dict, gt: list | None, category: str, reply: Reply) -> tuple[bool, bool]:
    """BFCL's own pipeline for one entry: ``(valid, raised)`` (``raised``: its checker raised, so BFCL's runner
    would have stopped; counted as wrong)."""
    up = upstream()

    def decode(fmt: Any) -> Any:
        if reply.fc:  # OpenAICompletionsHandler.decode_ast, FC branch
            return [{c["function"]["name"]: json.loads(c["function"]["arguments"])} for c in reply.calls]
        return up.decode_prompting(reply.text, fmt)

    if "relevance" in category or gt is None:  # _evaluate_single_relevance_entry (always ReturnFormat.PYTHON)
        try:
            has_call = not up.is_empty_output(decode(up.ReturnFormat.PYTHON))
        except Exception:  # noqa: BLE001 - a reply that does not decode holds no call
            has_call = False
        return (has_call if is_relevance(category) else not has_call), False
    try:  # _evaluate_single_ast_entry
        decoded = decode(return_format(category))
    except Exception:  # noqa: BLE001
        return False, False
    if not up.is_function_calling_format_output(decoded):
        return False, False
    model = FC_MODEL if reply.underscored else PROMPT_MODEL  # underscore_to_dot True / False
    try:
        result = up.ast_checker(question["function"], decoded, gt, language(category), category, model)
        return bool(result["valid"]), False
    except Exception:  # noqa: BLE001
        return False, True


# ---------------------------------------------------------------- measurement


def _empty_stats() -> dict[str, Any]:
    return {"n": 0, "agree": 0, "upstream_valid": 0, "project_valid": 0, "upstream_raised": 0,
            "fenced_n": 0, "fenced_lenient_valid": 0, "by_kind": {}, "examples": []}


def measure(data_dir: str | Path, limit: int | None = None, categories: list[str] | None = None,
            seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per category: ``{"n", "agree", "agreement", "upstream_valid", "project_valid", "upstream_raised",
    "fenced_n", "fenced_lenient_valid", "by_kind": {kind: [agree, n]}, "examples": [disagreements]}``.

    Categories BFCL does not AST-check (multi-turn, agentic) are skipped, as ``evals.bfcl.build_requests`` does.
    """
    rng = random.Random(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        requests = bfcl.build_requests(data_dir, limit, categories)
    out: dict[str, dict[str, Any]] = {}
    for req in requests:
        q, gt, cat = req["question"], req["ground_truth"], req["category"]
        st = out.setdefault(cat, _empty_stats())
        if gt is None:
            cases = list(no_call_replies(q))
        else:
            cases = [r for kind, calls in corruptions(q, gt, cat, rng).items() for r in replies(q, kind, calls, cat)]
        for reply in cases:
            ours = project_verdict(q, gt, cat, reply)
            theirs, raised = upstream_verdict(q, gt, cat, reply)
            st["n"] += 1
            st["agree"] += ours == theirs
            st["upstream_valid"] += theirs
            st["project_valid"] += ours
            st["upstream_raised"] += raised
            k = st["by_kind"].setdefault(f"{reply.kind}/{reply.style}", [0, 0])
            k[0] += ours == theirs
            k[1] += 1
            if ours != theirs and len(st["examples"]) < 5:
                st["examples"].append({"id": q["id"], "kind": reply.kind, "style": reply.style, "project": ours,
                                       "upstream": theirs, "reply": reply.calls if reply.text is None else reply.text})
            if reply.style == "prompt_fenced" and gt is not None:
                st["fenced_n"] += 1
                st["fenced_lenient_valid"] += project_verdict(q, gt, cat, reply, lenient=True)
    for st in out.values():
        st["agreement"] = st["agree"] / st["n"] if st["n"] else 1.0
    return out


def default_sources() -> dict[str, tuple[Path, list[str] | None]]:
    """{label: (dir, categories or None)}: the demo world's and the shared BFCL data when present, and the
    single-turn categories of bfcl-eval's own data that the shared data lacks."""
    import bfcl_eval

    upstream()
    sources: dict[str, tuple[Path, list[str] | None]] = {}
    for label, d in (("demo world", Path("runs/demo/world/bfcl")), ("shared data", Path("../shared/data/bfcl"))):
        if d.is_dir():
            sources[label] = (d, None)
    pkg = Path(bfcl_eval.__file__).parent / "data"
    shipped = set(bfcl.category_files(sources["shared data"][0])) if "shared data" in sources else set()
    live = [c for c in bfcl.category_files(pkg) if c.startswith("live_") and c not in shipped]
    if live:
        sources["bfcl-eval data (not shipped here)"] = (pkg, live)
    return sources


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown table: one row per source and category."""
    rows = ["| source | category | cases | agreement | upstream accepts | project accepts | fenced: lenient accepts |",
            "|---|---|---|---|---|---|---|"]
    for source, cats in results.items():
        for cat, st in cats.items():
            fenced = f"{st['fenced_lenient_valid']}/{st['fenced_n']}" if st["fenced_n"] else "-"
            rows.append(f"| {source} | {cat} | {st['n']} | {100 * st['agreement']:.2f}% | {st['upstream_valid']} | "
                        f"{st['project_valid']} | {fenced} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", help="BFCL data dirs (default: demo world, shared data, bfcl-eval's live data)")
    ap.add_argument("--limit", type=int, default=None, help="questions per category")
    ap.add_argument("--out", default=None, help="write the full results (with examples) as JSON")
    args = ap.parse_args(argv)
    sources = {d: (Path(d), None) for d in args.dirs} or default_sources()
    results = {label: measure(d, args.limit, cats) for label, (d, cats) in sources.items()}
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    low = [(s, c) for s, cats in results.items() for c, st in cats.items() if st["agreement"] < TARGET]
    if low:
        print(f"below {TARGET:.1%}: {low}", file=sys.stderr)
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
