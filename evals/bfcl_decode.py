"""A model's reply -> BFCL's decoded form ``[{func_name: {param: value}}]``: the one step BFCL does not provide.

BFCL scores a reply in one of two modes, and so does the project (``decode_reply``):

* **FC mode** (tools offered natively): the reply carries tool calls. They come as OpenAI ``tool_calls``
  (``{"type": "function", "function": {"name", "arguments"}}``, arguments an object or a JSON string), as
  ``{"name", "arguments"}`` objects, as BFCL's own ``{func: {args}}`` / ``{func: "args JSON"}`` (BFCL's result
  files), or as the project's chat format in raw text, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (``minitron.chat_format.parse_tool_calls``; the endpoint backend renders a server's tool calls the same way).
  OpenAI's name rule makes models write ``math.factorial`` as ``math_factorial``: a name that is an offered
  function's dotted name is given BFCL's FC spelling (dots as underscores) and checked the way BFCL checks FC
  models (``underscore_to_dot``), so both spellings are accepted, exactly as in BFCL's FC mode.
* **Prompt mode** (anything else: the calls are written as text): BFCL's own prompt-mode decoder
  (``default_decode_ast_prompting``) reads ``[f(a=1), g.h(b="x")]`` (Java / JavaScript syntax in those
  categories). As upstream, a python-fenced answer (```` ```python ... ``` ````) does not decode, plain JSON is
  not a call, and underscores are not read as dots. ``lenient=True`` (``--lenient``) reads the code inside a
  python fence when the strict decoding fails; such replies are flagged ``fenced`` and reported apart.

BFCL's prompt decoder ``eval``s arithmetic in arguments (``a=2*3``); the loader (``evals.bfcl_upstream``) lets it
evaluate constant arithmetic only, never names or calls from a model's text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from evals.bfcl_upstream import return_format, upstream
from minitron.chat_format import IM_END, parse_tool_calls

FC, PROMPT = "fc", "prompt"
# a fenced block labelled python (or py), anywhere in the reply: what --lenient reads
_PY_FENCE_RE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S | re.I)


class DecodeError(ValueError):
    """Tool calls that cannot be read as calls (not an object, arguments not an object or not JSON)."""


@dataclasses.dataclass
class Decoded:
    """A reply in BFCL's decoded form, or why it has none."""

    calls: list[dict] | None  # [{name: {param: value}}]; None when the reply could not be decoded
    mode: str  # FC (tool calls) or PROMPT (calls written as text)
    error: str = ""  # why it could not be decoded (calls is None)
    fenced: bool = False  # read from inside a ```python fence: only with lenient=True


def decode_reply(text: str | None = None, calls: Any = None, *, functions: list[dict], category: str,
                 lenient: bool = False) -> Decoded:
    """Decode a reply given as raw ``text`` or as structured tool ``calls`` (which win when both are given).

    ``functions`` are the question's BFCL function specs (to give offered dotted names their FC spelling);
    ``category`` picks the prompt-mode syntax (Python, Java, JavaScript).
    """
    if calls is not None:
        return _fc(calls, functions)
    text = text or ""
    if "<tool_call>" in text:
        try:
            return _fc(parse_tool_calls(text)[1], functions)
        except (ValueError, TypeError) as e:  # json errors are ValueErrors too
            return Decoded(None, FC, f"unreadable <tool_call>: {e}")
    return decode_prompt_text(text, category, lenient)


def decode_prompt_text(text: str, category: str, lenient: bool = False) -> Decoded:
    """Prompt mode: BFCL's decoder on the text (the chat format's end-of-turn marker removed)."""
    body = text.replace(IM_END, "")
    try:
        return Decoded(upstream().decode_prompting(body, return_format(category)), PROMPT)
    except Exception as e:  # noqa: BLE001 - upstream raises anything (SyntaxError, AssertionError, KeyError...)
        error = f"{type(e).__name__}: {e or 'not a list of function calls'}"
    fence = _PY_FENCE_RE.search(body) if lenient else None
    if fence:
        try:
            return Decoded(upstream().decode_prompting(fence.group(1), return_format(category)), PROMPT, fenced=True)
        except Exception as e:  # noqa: BLE001
            error += f" (inside the python fence: {type(e).__name__}: {e})"
    return Decoded(None, PROMPT, error)


# ---------------------------------------------------------------- FC mode: tool calls


def _fc(calls: Any, functions: list[dict]) -> Decoded:
    """Tool calls -> decoded form, offered dotted names spelled as BFCL's FC mode spells them."""
    try:
        flat = normalize_calls(calls)
    except DecodeError as e:
        return Decoded(None, FC, str(e))
    dotted = {f.get("name") for f in functions if "." in str(f.get("name"))}
    return Decoded([{(n.replace(".", "_") if n in dotted else n): args} for n, args in flat], FC)


def normalize_calls(obj: Any) -> list[tuple[str, dict]]:
    """Tool calls in any accepted shape -> ``[(name, arguments)]`` (DecodeError for anything else).

    Accepts one call or a list of calls: ``{"name", "arguments"}`` (arguments may be a JSON string;
    ``parameters`` is an alias), OpenAI's ``{"type": "function", "function": {...}}`` and ``{"tool_calls": [...]}``,
    and BFCL's ``{name: {...}}`` or ``{name: "JSON"}``.
    """
    if isinstance(obj, dict) and "tool_calls" in obj:
        obj = obj["tool_calls"] or []
    return [_one_call(item) for item in (obj if isinstance(obj, list) else [obj])]


def _one_call(item: Any) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise DecodeError(f"a function call must be an object, got {type(item).__name__}: {item!r:.200}")
    if isinstance(item.get("function"), dict):
        item = item["function"]
    if isinstance(item.get("name"), str) and set(item) <= {"name", "arguments", "parameters", "id", "type"}:
        name, args = item["name"], item.get("arguments", item.get("parameters", {}))
    elif len(item) == 1:
        ((name, args),) = item.items()
    else:
        raise DecodeError(f"not a function call (expected name and arguments): {item!r:.200}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DecodeError(f"arguments of {name!r} are not valid JSON: {args!r:.200}") from e
    if not isinstance(args, dict):
        raise DecodeError(f"arguments of {name!r} are not an object: {args!r:.200}")
    return str(name), args
