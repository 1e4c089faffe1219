"""Decoding for the BFCL-style checker: model text -> function calls, and Java/JavaScript literals -> values.

Three output syntaxes are read (``decode_output``):

* the project's tool-call format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (``minitron.chat_format.parse_tool_calls``), one block per call;
* plain JSON: one ``{"name", "arguments"}`` object or a list of them (OpenAI ``{"function": {...}}`` and
  BFCL ``{"func": {"arg": value}}`` shapes too);
* python-call syntax, ``func(a=1, b="x")`` or ``[f(a=1), g.h(b=2)]``, parsed with ``ast`` (BFCL's prompting
  format). A non-literal argument (a variable, an expression) becomes its source text, as in BFCL.

Every decoded call is ``{"name": str, "arguments": dict}``. Text with no call in it decodes to ``[]``;
a call that cannot be read (truncated JSON, positional arguments) raises ``DecodeError``.

Java and JavaScript categories pass arguments as source literals (``"new ArrayList<>(Arrays.asList(1, 2))"``,
``"{key: 'v'}"``, ``"42L"``); ``convert_java`` / ``convert_js`` turn them into Python values by the declared
type, like BFCL's type converters, and leave a value they cannot read as the original string.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import re
import tokenize
from typing import Any

from minitron.chat_format import IM_END, parse_tool_calls


class DecodeError(ValueError):
    """Model output that tries to call a function but cannot be read as a call."""


_FENCE_RE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)\n?```", re.S)  # a markdown code block, anywhere
_CALL_START_RE = re.compile(r"^\[?\s*[A-Za-z_][\w.]*\s*\(")


# ---------------------------------------------------------------- calls from text


def decode_output(text: str | None) -> list[dict[str, Any]]:
    """All function calls in a model's raw output (``[]`` when it answers in plain text)."""
    if not text or not text.strip():
        return []
    if "<tool_call>" in text:
        try:
            return parse_tool_calls(text)[1]
        except (ValueError, TypeError) as e:  # json errors are ValueErrors too
            raise DecodeError(str(e)) from e
    body = text.replace(IM_END, "").strip()
    fence = _FENCE_RE.search(body)
    if fence:
        body = fence.group(1).strip()
    if body[:1] in "[{":
        try:
            return normalize_calls(json.loads(body))
        except json.JSONDecodeError:
            lines = [ln for ln in body.splitlines() if ln.strip()]
            if len(lines) > 1 and all(ln.lstrip()[:1] == "{" for ln in lines):
                return normalize_calls([_json_line(ln) for ln in lines])  # one JSON call per line
    try:
        return _python_calls(body)
    except DecodeError:
        if body[:1] in "[{" or _CALL_START_RE.match(body):
            raise
        return []  # prose: no function call


def _json_line(line: str) -> Any:
    """One line of a one-call-per-line JSON output."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DecodeError(f"not a JSON function call: {line[:200]!r}") from e


def normalize_calls(obj: Any) -> list[dict[str, Any]]:
    """Calls given as data -> ``[{"name", "arguments"}]``.

    Accepts one call or a list of calls in the shapes ``{"name": n, "arguments": {...}}`` (arguments may be a
    JSON string; ``parameters`` is an alias), OpenAI's ``{"type": "function", "function": {...}}`` and
    ``{"tool_calls": [...]}``, and BFCL's ``{n: {...}}``.
    """
    if isinstance(obj, dict) and "tool_calls" in obj:
        obj = obj["tool_calls"] or []
    items = obj if isinstance(obj, list) else [obj]
    return [_one_call(item) for item in items]


def _one_call(item: Any) -> dict[str, Any]:
    """One call in any of the accepted shapes -> ``{"name", "arguments"}`` (DecodeError otherwise)."""
    if not isinstance(item, dict):
        raise DecodeError(f"a function call must be an object, got {type(item).__name__}: {item!r:.200}")
    if isinstance(item.get("function"), dict):
        item = item["function"]
    if isinstance(item.get("name"), str) and set(item) <= {"name", "arguments", "parameters", "id", "type"}:
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DecodeError(f"arguments of {item['name']!r} are not valid JSON: {args!r:.200}") from e
        name = item["name"]
    elif len(item) == 1:
        ((name, args),) = item.items()
    else:
        raise DecodeError(f"not a function call (expected name and arguments): {item!r:.200}")
    if not isinstance(args, dict):
        raise DecodeError(f"arguments of {name!r} are not an object: {args!r:.200}")
    return {"name": str(name), "arguments": args}


def _python_calls(body: str) -> list[dict[str, Any]]:
    """``f(a=1)`` or ``[f(a=1), g(b=2)]`` (a tuple works too) -> calls."""
    body, renamed = _rename_keyword_args(body)
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError as e:
        raise DecodeError(f"not a python function call: {body[:200]!r}") from e
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if not all(isinstance(n, ast.Call) for n in nodes):
        raise DecodeError(f"not a python function call: {body[:200]!r}")
    calls = []
    for node in nodes:
        name = _dotted_name(node.func)
        if node.args:
            raise DecodeError(f"{name}: positional arguments cannot be matched to parameters; use name=value")
        if any(kw.arg is None for kw in node.keywords):
            raise DecodeError(f"{name}: **kwargs cannot be checked; pass each argument by name")
        args = {renamed.get(kw.arg, kw.arg): _ast_value(kw.value) for kw in node.keywords}
        calls.append({"name": name, "arguments": args})
    return calls


def _rename_keyword_args(body: str) -> tuple[str, dict[str, str]]:
    """Argument names that are python keywords (Java's ``from=``, ``class=``) -> placeholders python can parse."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, SyntaxError):
        return body, {}
    lines = body.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    # Tokens give exact positions outside string literals; edit the text there, from the end backwards.
    renamed, edits = {}, []
    for prev, tok, nxt in zip(tokens, tokens[1:], tokens[2:]):
        if (tok.type == tokenize.NAME and keyword.iskeyword(tok.string) and prev.string in ("(", ",")
                and nxt.string == "="):
            alias = f"_kw_{tok.string}_"
            renamed[alias] = tok.string
            edits.append((starts[tok.start[0] - 1] + tok.start[1], len(tok.string), alias))
    for offset, length, alias in reversed(edits):
        body = body[:offset] + alias + body[offset + length:]
    return body, renamed


def _dotted_name(node: ast.AST) -> str:
    """``math.factorial`` from the call's ``func`` node (names and attribute chains only)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise DecodeError(f"cannot read a function name from {ast.unparse(node)!r}")


def _ast_value(node: ast.AST) -> Any:
    """A literal argument as its value (tuples as lists); a variable or expression as its source text."""
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_ast_value(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        try:
            return {_ast_value(k): _ast_value(v) for k, v in zip(node.keys, node.values)}
        except TypeError:  # an unhashable key such as a list
            return ast.unparse(node)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return node.id if isinstance(node, ast.Name) else ast.unparse(node)


# ---------------------------------------------------------------- Java / JavaScript literals

# Numeric literals; Java adds L (long), f/d (float/double) suffixes, JavaScript n (BigInt).
_INT = r"[-+]?\d+"
_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OPEN, _CLOSE = "([{", ")]}"
_UNTYPED = (None, "any", "Any", "Object")  # element types read as untyped literals


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` at ``sep`` outside quotes and brackets; empty pieces (``[1, 2, ]``) are dropped."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def _unquote(s: str, quotes: str) -> str | None:
    """The text inside matching quotes (escapes resolved), or None when ``s`` is not one quoted literal."""
    if len(s) < 2 or s[0] != s[-1] or s[0] not in quotes:
        return None
    q, inner = s[0], s[1:-1]
    i = 0
    while i < len(inner):  # an unescaped quote inside means two literals ('a' + 'b'), not one
        if inner[i] == "\\":
            i += 1
        elif inner[i] == q:
            return None
        i += 1
    if q == '"':
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return inner
    return inner.replace("\\" + q, q).replace("\\\\", "\\")


def _json_container(s: str, kind: type) -> Any:
    """``s`` read as JSON when it is a ``kind`` (list or dict) there; else None."""
    try:
        value = json.loads(s)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, kind) else None


def java_value(s: str) -> Any:
    """An untyped Java literal: boolean, null, string, char, number (L/f/d suffixes), collection, or raw text."""
    s = s.strip()
    if s in ("true", "false"):
        return s == "true"
    if s == "null":
        return None
    quoted = _unquote(s, "\"'")
    if quoted is not None:
        return quoted
    if re.fullmatch(_INT + "[lL]?", s):
        return int(s.rstrip("lL"))
    if re.fullmatch(_FLOAT + "[fFdD]?", s):
        return float(s.rstrip("fFdD"))
    for kind in (dict, list):  # dict first: a JSON object would also pass for a bare {..} array initializer
        value = _java_collection(s, kind)
        if value is not None:
            return value
    return s


# The ways a Java model writes a collection; each pattern's named group says how to read the inside.
_JAVA_NEW = r"new\s+[\w.]+\s*(?:<[^(){}]*>)?\s*"
_JAVA_LIST_PATTERNS = [
    _JAVA_NEW + r"(?:\[\s*\]\s*)+\{(?P<items>.*)\}",  # new int[]{1, 2} / new String[][]{{..}}
    r"\{(?P<items>.*)\}",  # bare array initializer
    _JAVA_NEW + r"\(\s*(?:java\.util\.)?(?:Arrays\.asList|List\.of|Set\.of)\s*\((?P<items>.*)\)\s*\)",
    r"(?:java\.util\.)?(?:Arrays\.asList|List\.of|Set\.of|Stream\.of)\s*\((?P<items>.*)\)",
    _JAVA_NEW + r"\(\s*\)\s*\{\s*\{(?P<adds>.*)\}\s*\}",  # double-brace initialisation: add(x); add(y);
    _JAVA_NEW + r"\(\s*\)(?P<empty>)",
]
_JAVA_MAP_PATTERNS = [
    _JAVA_NEW + r"\(\s*\)\s*\{\s*\{?(?P<puts>.*?)\}?\s*\}",  # new HashMap<>() {{ put(k, v); }}
    r"(?:java\.util\.)?Map\.of\s*\((?P<pairs>.*)\)",
    _JAVA_NEW + r"\(\s*\)(?P<empty>)",
]


def _java_collection(s: str, kind: type, item_type: str | None = None) -> Any:
    """A Java list/array (``kind=list``) or map (``kind=dict``) expression -> list/dict, or None."""
    for pattern in _JAVA_LIST_PATTERNS if kind is list else _JAVA_MAP_PATTERNS:
        m = re.fullmatch(pattern, s.strip(), re.S)
        if not m:
            continue
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        if "empty" in groups:
            return kind()
        elem = (lambda e: convert_java(e, item_type)) if item_type not in _UNTYPED else java_value
        if "items" in groups:
            return [elem(e) for e in split_top(groups["items"])]
        calls = [_method_args(stmt) for stmt in split_top(groups.get("adds", groups.get("puts", "")), ";")]
        if "adds" in groups:
            return [elem(a[0]) for a in calls if a and len(a) == 1]
        if "puts" in groups:
            return {java_value(a[0]): java_value(a[1]) for a in calls if a and len(a) == 2}
        pairs = split_top(groups["pairs"])
        return {java_value(k): java_value(v) for k, v in zip(pairs[::2], pairs[1::2])}
    return _json_container(s, kind)


def _method_args(stmt: str) -> list[str] | None:
    """The argument sources of ``add(x)`` / ``put(k, v)`` in a double-brace initializer, or None."""
    m = re.fullmatch(r"(?:this\.)?\w+\s*\((.*)\)", stmt.strip(), re.S)
    return split_top(m.group(1)) if m else None


def convert_java(value: str, java_type: str, item_type: str | None = None) -> Any:
    """A Java source literal -> Python value by its declared Java type; the string itself when unreadable."""
    s = value.strip()
    if java_type in ("byte", "short", "integer", "int", "Integer") and re.fullmatch(_INT, s):
        return int(s)
    if java_type in ("long", "Long") and re.fullmatch(_INT + "[lL]?", s):  # an int literal widens to long
        return int(s.rstrip("lL"))
    if java_type in ("float", "double", "Float", "Double") and re.fullmatch(_FLOAT + "[fFdD]?", s):
        return float(s.rstrip("fFdD"))
    if java_type in ("boolean", "Boolean") and s in ("true", "false"):
        return s == "true"
    if java_type in ("char", "String"):
        quoted = _unquote(s, "'" if java_type == "char" else '"')
        return value if quoted is None else quoted
    kind = {"Array": list, "ArrayList": list, "List": list, "Set": list, "Queue": list, "Stack": list,
            "HashMap": dict, "Hashtable": dict, "Map": dict}.get(java_type)
    if kind is not None:
        parsed = _java_collection(s, kind, item_type)
        return value if parsed is None else parsed
    return value  # any, or a value that does not read as its type: a variable name, an expression


def js_value(s: str) -> Any:
    """An untyped JavaScript literal: boolean, null, string, number, BigInt, array, object, or raw text."""
    s = s.strip()
    if s in ("true", "false"):
        return s == "true"
    if s in ("null", "undefined"):
        return None
    quoted = _unquote(s, "\"'`")
    if quoted is not None:
        return quoted
    if re.fullmatch(_INT + "n?", s):
        return int(s.rstrip("n"))
    if re.fullmatch(_FLOAT, s):
        return float(s)
    for kind in (list, dict):
        value = _js_collection(s, kind)
        if value is not None:
            return value
    return s


def _js_collection(s: str, kind: type, item_type: str | None = None) -> Any:
    """A JavaScript array literal (``[..]``, ``new Array(..)``) or object literal -> list/dict, or None."""
    s = s.strip()
    if kind is list:  # [a, b] or new Array(a, b)
        m = re.fullmatch(r"\[(.*)\]|new\s+Array\s*\((.*)\)", s, re.S)
        if not m:
            return None
        elem = (lambda e: convert_js(e, item_type)) if item_type not in _UNTYPED else js_value
        return [elem(e) for e in split_top(m.group(1) if m.group(1) is not None else m.group(2))]
    m = re.fullmatch(r"\{(.*)\}", s, re.S)
    if not m:
        return None
    out = {}  # {key: value, 'key': value, "key": value}; values are read untyped
    for pair in split_top(m.group(1)):
        key_val = split_top(pair, ":")
        if len(key_val) != 2:
            return _json_container(s, dict)  # not a plain {key: value} literal (shorthand, spread ...)
        key, val = key_val
        k = _unquote(key, "\"'`")
        out[key if k is None else k] = js_value(val)
    return out


def convert_js(value: str, js_type: str, item_type: str | None = None) -> Any:
    """A JavaScript source literal -> Python value by its declared type; the string itself when unreadable."""
    s = value.strip()
    if js_type in ("String", "string"):
        quoted = _unquote(s, "\"'`")
        return value if quoted is None else quoted
    if js_type in ("integer", "number", "Number") and re.fullmatch(_INT, s):
        return int(s)
    if js_type in ("float", "number", "Number") and re.fullmatch(_FLOAT, s):
        return float(s)
    if js_type in ("Bigint", "BigInt") and re.fullmatch(_INT + "n?", s):
        return int(s.rstrip("n"))
    if js_type in ("Boolean", "boolean") and s in ("true", "false"):
        return s == "true"
    kind = {"array": list, "Array": list, "dict": dict, "object": dict, "Object": dict}.get(js_type)
    if kind is not None:
        parsed = _js_collection(s, kind, item_type)
        return value if parsed is None else parsed
    return value
