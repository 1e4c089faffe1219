"""The one chat and tool-call format of the project.

Turns are ChatML (``<|im_start|>role\\n...<|im_end|>``) after a single BOS. Tools (JSON-schema functions) are
rendered into the system turn inside ``<tools></tools>``, one JSON object per line. The assistant calls a tool
with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one per call, several for parallel calls);
a tool result comes back as a ``tool`` turn wrapped in ``<tool_response>``. This is the Hermes format, so
vLLM's ``hermes`` tool parser reads it; SFT data, the function-calling eval and the chat client all use it.

An end of turn is ``<|im_end|>``: it is listed with EOS in the generation config so that generation stops there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (Path(__file__).with_name("chat_template.jinja")).read_text()
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, IM_START, IM_END]
# Atomic but not "special": they must survive decoding with skip_special_tokens=True (vLLM's default).
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
TOOL_PARSER = "hermes"  # vLLM --tool-call-parser for this template

_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def install_chat_template(tokenizer: Any, force: bool = False) -> bool:
    """Give ``tokenizer`` the project template (and its tokens) when it has none; True if it was installed."""
    if getattr(tokenizer, "chat_template", None) and not force:
        return False
    missing = [t for t in [IM_START, IM_END] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    new_tool_tokens = [t for t in TOOL_TOKENS if t not in tokenizer.get_vocab()]
    if new_tool_tokens:
        tokenizer.add_tokens(new_tool_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    return True


def ensure_tool_template(tokenizer: Any) -> bool:
    """Replace a ChatML template that cannot render tools (SmolLM2's ignores ``tools`` and ``tool_calls``) by the
    project's, so that SFT on tool use, the function-calling eval and vLLM's tool parser see the tools; True if
    replaced. Only for ChatML vocabularies: no token is added (tool tags stay plain text for such a model)."""
    template = getattr(tokenizer, "chat_template", None)
    vocab = tokenizer.get_vocab()
    if not template or "tools" in template or IM_START not in vocab or IM_END not in vocab:
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    return True


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and end-of-turn ids: the generation config's ``eos_token_id`` list."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is not None and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return [i for i in ids if i is not None]


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into (content, calls); each call is ``{"name": str, "arguments": dict}``.

    Raises ValueError for a ``<tool_call>`` block that is not JSON with a name and an arguments object.
    """
    calls = []
    for block in _CALL_RE.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call is not valid JSON: {block[:200]!r}") from e
        if not isinstance(obj, dict) or "name" not in obj:
            raise ValueError(f"tool call has no name: {block[:200]!r}")
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, dict):
            raise ValueError(f"tool call arguments are not an object: {block[:200]!r}")
        calls.append({"name": obj["name"], "arguments": args})
    content = _CALL_RE.sub("", text).replace(IM_END, "").strip()
    return content, calls


def tool_call_message(calls: list[dict[str, Any]], content: str = "") -> dict[str, Any]:
    """An assistant message in the OpenAI/HF shape for ``calls`` ([{"name", "arguments"}])."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls],
    }


# ----------------------------------------------------------------------------------------- SteerLM attributes
# SteerLM (attribute-conditioned SFT, ``align/steerlm.py``) writes the wanted attributes of a reply as one line at
# the top of the system turn: the values, then the same values in words (``ATTRIBUTE_WORDS``),
#     Attributes: helpfulness=4 verbosity=0. Give the most helpful answer you can. Answer in one short sentence.
# Values are integers on a 0-4 scale (HelpSteer's); the names are those the model was trained with
# (``ATTRIBUTE_NAMES`` for the project's stages), always in that order. The words are there for a pretrained
# student, which already follows such instructions: it learns the condition faster from them (the real student,
# 40 steps: 0.27 against 0.05 nats with the bare values; align/README.md, SteerLM). A served model is steered by
# sending that line as (the start of) the system prompt; ``minitron chat`` builds it with ``/attributes verbosity=0``.
ATTRIBUTE_NAMES = ("helpfulness", "verbosity")
ATTRIBUTE_MAX = 4
ATTRIBUTE_PREFIX = "Attributes:"
_ATTR_RE = re.compile(r"([A-Za-z_]+)\s*=\s*(-?\d+)")
ATTRIBUTE_WORDS = {  # value 0..4 -> the instruction that says it
    "helpfulness": ("Give an unhelpful answer.", "Give a barely helpful answer.", "Give a somewhat helpful answer.",
                    "Give a helpful answer.", "Give the most helpful answer you can."),
    "verbosity": ("Answer in one short sentence.", "Answer briefly, in a sentence or two.",
                  "Answer in a few sentences.", "Answer in detail.", "Answer in detail, in several sentences."),
}


def attribute_line(values: dict[str, int]) -> str:
    """``Attributes: name=v ...`` for ``values`` (known names first in ``ATTRIBUTE_NAMES`` order, then any others
    sorted), then the values of the names ``ATTRIBUTE_WORDS`` knows in words; each value must be an integer in
    0..ATTRIBUTE_MAX."""
    names = [n for n in ATTRIBUTE_NAMES if n in values] + sorted(n for n in values if n not in ATTRIBUTE_NAMES)
    parts = []
    for n in names:
        v = values[n]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= ATTRIBUTE_MAX:
            raise ValueError(f"attribute {n}={v!r}: values are integers 0..{ATTRIBUTE_MAX}")
        parts.append(f"{n}={v}")
    words = [ATTRIBUTE_WORDS[n][values[n]] for n in names if n in ATTRIBUTE_WORDS]
    line = f"{ATTRIBUTE_PREFIX} " + " ".join(parts)
    return f"{line}. {' '.join(words)}" if words else line


def parse_attributes(text: str) -> dict[str, int]:
    """The ``name=value`` pairs of an attribute line (``Attributes: verbosity=0 ...``, or the bare pairs as typed
    after ``/attributes``); a system prompt is searched for its ``Attributes:`` line. Raises ValueError on a value
    outside 0..ATTRIBUTE_MAX or text with no pair."""
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(ATTRIBUTE_PREFIX)]
    body = lines[0].strip()[len(ATTRIBUTE_PREFIX):] if lines else text
    values = {k: int(v) for k, v in _ATTR_RE.findall(body)}
    if not values:
        raise ValueError(f"no name=value attribute in {text[:80]!r} (e.g. verbosity=0 helpfulness=4)")
    bad = {k: v for k, v in values.items() if not 0 <= v <= ATTRIBUTE_MAX}
    if bad:
        raise ValueError(f"attribute values are integers 0..{ATTRIBUTE_MAX} (got {bad})")
    return values


def with_attributes(messages: list[dict[str, Any]], values: dict[str, int] | None) -> list[dict[str, Any]]:
    """``messages`` with ``attribute_line(values)`` as the first line of the system turn (a system turn is added
    when there is none; an attribute line already there is replaced). ``values`` None or empty: unchanged."""
    if not values:
        return list(messages)
    line = attribute_line(values)
    if messages and messages[0].get("role") == "system":
        rest = [ln for ln in str(messages[0].get("content") or "").splitlines()
                if not ln.strip().startswith(ATTRIBUTE_PREFIX)]
        content = "\n".join([line, *rest]) if any(ln.strip() for ln in rest) else line
        return [{**messages[0], "content": content}, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]
