"""BFCL function specs -> OpenAI tools: the one tool format the project trains and evaluates with.

BFCL (the Berkeley Function Calling Leaderboard) describes functions as ``{"name", "description", "parameters":
{"type": "dict", "properties", "required"}}`` with its own type names (``dict``, ``float``, ``tuple``, Java's
``ArrayList``, JavaScript's ``Bigint``...). Chat templates and OpenAI-compatible servers take JSON-schema tools
``{"type": "function", "function": {...}}``. ``to_openai_tools`` converts the first into the second the way
BFCL's function-calling (FC) mode does. It lives in the core because the demo world (``minitron.world``) writes
its SFT tool schemas with it, and the function-calling eval (``evals.bfcl``) offers the same schemas.
"""

from __future__ import annotations

import copy
import json

# BFCL type names -> JSON-schema (OpenAPI) types, as BFCL's GORILLA_TO_OPENAPI.
OPENAPI_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string",
                 "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
                 "object": "object", "tuple": "array", "any": "string", "byte": "integer", "short": "integer",
                 "long": "integer", "double": "number", "char": "string", "ArrayList": "array", "Array": "array",
                 "HashMap": "object", "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string",
                 "String": "string", "Bigint": "integer"}
LANGUAGE_HINTS = {"python": " Note that the provided function is in Python 3 syntax.",
                  "java": " Note that the provided function is in Java 8 SDK syntax.",
                  "javascript": " Note that the provided function is in JavaScript syntax."}


def language_of(category: str) -> str:
    """``java``, ``javascript`` or ``python`` from a BFCL category name (simple_java, simple_javascript, ...)."""
    if "javascript" in category:
        return "javascript"
    return "java" if "java" in category else "python"


def to_openai_tools(functions: list[dict], category: str = "simple_python", underscore_names: bool = False,
                    hints: bool = True) -> list[dict]:
    """BFCL function specs -> OpenAI tools ``{"type": "function", "function": {...}}``, as BFCL's FC mode does.

    Types are mapped to JSON schema (``dict`` -> ``object``, ``float`` -> ``number``, ``tuple`` -> ``array``);
    Java and JavaScript parameters become strings "in string representation" of their declared type, with the
    type named in the description. ``hints`` adds BFCL's description notes (the language hint on each
    function, "This is a float type value." on floats); leave them out for a model fine-tuned on plain tool
    schemas. ``underscore_names`` replaces ``.`` in names by ``_`` (OpenAI's name rule; the function-calling eval
    accepts both spellings of a tool call's name). The input is not modified.
    """
    language = language_of(category)
    tools = []
    for spec in copy.deepcopy(functions):
        spec["description"] = spec.get("description", "") + (LANGUAGE_HINTS[language] if hints else "")
        params = spec.setdefault("parameters", {})
        params["type"] = "object"
        props = params.setdefault("properties", {})
        if language != "python":
            _stringify_params(props, language)
        _cast_types(props, hints)
        if underscore_names:
            spec["name"] = spec["name"].replace(".", "_")
        tools.append({"type": "function", "function": spec})
    return tools


def _stringify_params(props: dict, language: str) -> None:
    """Java/JavaScript parameters are passed as source literals: type string, declared type in the text."""
    lang = "Java" if language == "java" else "JavaScript"
    for p in props.values():
        desc, tp = p.get("description", ""), p.get("type", "any")
        if tp == "any":
            desc += f" This parameter can be of any type of {lang} object in string representation."
        else:
            desc += f" This is {lang} {tp} type parameter in string representation."
        if "items" in p:
            item = p.pop("items").get("type")
            desc += f" The list elements are of type {item}; they are not in string representation."
        if "properties" in p:
            desc += (" The dictionary entries have the following schema; they are not in string representation. "
                     + json.dumps(p.pop("properties")))
        p["description"], p["type"] = desc, "string"


def _cast_types(props: dict, hints: bool = True) -> None:
    """BFCL types -> JSON-schema types, recursively through ``properties`` and ``items``."""
    for p in props.values():
        tp = p.get("type", "string")
        if tp == "float" and hints:
            p["format"] = "float"
            p["description"] = p.get("description", "") + " This is a float type value."
        p["type"] = OPENAPI_TYPES.get(tp, "string")
        if isinstance(p.get("properties"), dict):
            _cast_types(p["properties"], hints)
        if isinstance(p.get("items"), dict):
            _cast_types({"items": p["items"]}, hints)
