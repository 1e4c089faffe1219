"""Verifiable-instruction augmentation of SFT examples (the IF data of Tulu 3, built with lm-eval's IFEval code).

An example ``(prompt, answer)`` gets one to ``max_constraints`` format constraints appended to its prompt (the
instruction text written by lm-eval's own IFEval ``build_description``) and its answer rewritten to satisfy them
(lower case, a title in ``<<>>``, a postscript, bullets, ``***`` paragraphs, quotes, JSON...). Every rewritten
answer is checked with the same instruction's ``check_following``: a combination the checker rejects is dropped,
so the data never teaches a wrong format. Only the instruction *types* are shared with IFEval; its prompts are
never used (the evaluation stays held out). Instructions that need new content (another language, a second
response, a yes/no verdict) are not generated.
"""

from __future__ import annotations

import json
import random
import re
from itertools import islice
from typing import Any, Callable, Iterator

from minitron.punkt import ifeval_instructions

_WORD = re.compile(r"[A-Za-z]{5,}")
_FORBIDDEN_POOL = ["banana", "volcano", "submarine", "penguin", "galaxy", "orchestra", "umbrella", "dinosaur",
                   "pyramid", "tornado", "saxophone", "glacier", "lantern", "meadow", "compass", "harbor"]
_PLACEHOLDERS = ["[name]", "[date]", "[address]", "[email]", "[phone number]", "[company]"]


def _sentences(util: Any, text: str) -> list[str]:
    return [s.strip() for s in util.split_into_sentences(text) if s.strip()]


def _groups(items: list[str], n: int) -> list[str]:
    """``items`` in ``n`` consecutive, non-empty groups joined by spaces."""
    size = -(-len(items) // n)
    return [" ".join(items[i:i + size]) for i in range(0, len(items), size)]


# Each rule: (answer, prompt, rng, util) -> (kwargs for build_description, new answer), or None when not applicable.
Rule = Callable[[str, str, random.Random, Any], "tuple[dict, str] | None"]


def _relation(rng: random.Random, n: int) -> tuple[str, int]:
    """A comparison the count ``n`` satisfies: "at least" a bit below it, or "less than" a bit above."""
    if rng.random() < 0.5 and n > 1:
        return "at least", max(1, int(n * rng.uniform(0.6, 1.0)))
    return "less than", int(n * rng.uniform(1.1, 1.6)) + 2


def _bullets(a, p, rng, u):
    s = _sentences(u, a)
    if not 2 <= len(s) <= 8 or any(x.startswith(("*", "-")) for x in s):
        return None
    return {"num_bullets": len(s)}, "\n".join(f"* {x}" for x in s)


def _highlights(a, p, rng, u):
    s = _sentences(u, a)
    if not s or "*" in a:
        return None
    k = rng.randint(1, min(3, len(s)))
    return {"num_highlights": k}, " ".join(f"*{x}*" if i < k else x for i, x in enumerate(s))


def _sections(a, p, rng, u):
    s = _sentences(u, a)
    if len(s) < 2:
        return None
    spliter, groups = rng.choice(["Section", "SECTION"]), _groups(s, rng.randint(2, min(4, len(s))))
    return ({"section_spliter": spliter, "num_sections": len(groups)},
            "\n\n".join(f"{spliter} {i + 1}\n{g}" for i, g in enumerate(groups)))


def _paragraphs(a, p, rng, u):
    s = _sentences(u, a)
    if len(s) < 2:
        return None
    groups = _groups(s, rng.randint(2, min(4, len(s))))
    return {"num_paragraphs": len(groups)}, "\n\n***\n\n".join(groups)


def _words(a, p, rng, u):
    rel, n = _relation(rng, u.count_words(a))
    return {"relation": rel, "num_words": n}, a


def _sentence_count(a, p, rng, u):
    rel, n = _relation(rng, len(u.split_into_sentences(a)))
    return {"relation": rel, "num_sentences": n}, a


def _keywords(a, p, rng, u):
    words = sorted({w.lower() for w in _WORD.findall(a)})
    return ({"keywords": rng.sample(words, min(2, len(words)))}, a) if words else None


def _forbidden(a, p, rng, u):
    absent = [w for w in _FORBIDDEN_POOL if w not in a.lower()]
    return {"forbidden_words": rng.sample(absent, 2)}, a


def _frequency(a, p, rng, u):
    words = [w.lower() for w in _WORD.findall(a)]
    if not words:
        return None
    w = rng.choice(words)
    rel, n = _relation(rng, len(re.findall(rf"\b{w}\b", a, re.I)))
    return {"keyword": w, "frequency": n, "relation": rel}, a


def _letter(a, p, rng, u):
    letter = rng.choice("etaoinsrhl")
    rel, n = _relation(rng, a.lower().count(letter))
    return {"letter": letter, "let_frequency": n, "let_relation": rel}, a


def _placeholders(a, p, rng, u):
    k = rng.randint(1, 3)
    return {"num_placeholders": k}, f"{a}\n\n" + ", ".join(_PLACEHOLDERS[:k])


def _postscript(a, p, rng, u):
    marker = rng.choice(["P.S.", "P.P.S"])
    return {"postscript_marker": marker}, f"{a}\n\n{marker} I hope this helps."


def _title(a, p, rng, u):
    words = re.findall(r"[A-Za-z]+", p)[:4]
    return ({}, f"<<{' '.join(w.capitalize() for w in words)}>>\n\n{a}") if words else None


def _end(a, p, rng, u):
    phrase = rng.choice(["Any other questions?", "Is there anything else I can help with?"])
    return {"end_phrase": phrase}, f"{a}\n\n{phrase}"


def _repeat(a, p, rng, u):
    return {"prompt_to_repeat": p}, f"{p}\n\n{a}"


def _no_comma(a, p, rng, u):
    return {}, a.replace(",", "")


def _lower(a, p, rng, u):
    return {}, a.lower()


def _upper(a, p, rng, u):
    return {}, a.upper()


def _capital_words(a, p, rng, u):
    rel, n = _relation(rng, len(re.findall(r"\b[A-Z]{2,}\b", a)) or 1)
    return {"capital_frequency": n, "capital_relation": rel}, a


def _quotation(a, p, rng, u):
    return {}, f'"{a}"'


def _json(a, p, rng, u):
    return {}, json.dumps({"response": a}, ensure_ascii=False)


# In application order: structure first, then appended text, then case, then a wrapper around everything.
RULES: dict[str, Rule] = {
    "combination:repeat_prompt": _repeat,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "length_constraints:number_paragraphs": _paragraphs,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "startend:end_checker": _end,
    "detectable_format:title": _title,
    "punctuation:no_comma": _no_comma,
    "change_case:english_lowercase": _lower,
    "change_case:english_capital": _upper,
    "length_constraints:number_words": _words,
    "length_constraints:number_sentences": _sentence_count,
    "keywords:existence": _keywords,
    "keywords:forbidden_words": _forbidden,
    "keywords:frequency": _frequency,
    "keywords:letter_frequency": _letter,
    "change_case:capital_word_frequency": _capital_words,
    "startend:quotation": _quotation,
    "detectable_format:json_format": _json,
}
# Rules that rewrite the whole answer after counting rules have run: counts are taken at the end instead.
_WRAPPERS = {"startend:quotation", "detectable_format:json_format"}


def _conflict(ids: list[str], new: str, conflicts: dict[str, set[str]]) -> bool:
    return any(new in conflicts.get(i, ()) or i in conflicts.get(new, ()) or i == new for i in ids)


def _checker(registry: dict, rule_id: str, kwargs: dict) -> tuple[Any, str]:
    """lm-eval's checker for ``rule_id`` set up with ``kwargs``, and the instruction text it wrote."""
    checker = registry[rule_id](rule_id)
    return checker, checker.build_description(**kwargs)


def constrain(prompt: str, answer: str, rng: random.Random, max_constraints: int = 2) -> dict[str, Any] | None:
    """``{"prompt", "answer", "instruction_id_list", "kwargs"}`` with 1..max constraints, or None if none verified."""
    registry, conflicts, util = ifeval_instructions()
    ids: list[str] = []
    for rule_id in rng.sample(list(RULES), len(RULES)):
        if len(ids) >= rng.randint(1, max_constraints):
            break
        if not _conflict(ids, rule_id, conflicts) and not (rule_id in _WRAPPERS and _WRAPPERS & set(ids)):
            ids.append(rule_id)
    ids.sort(key=list(RULES).index)
    text, kwargs = answer.strip(), []
    for rule_id in ids:
        made = RULES[rule_id](text, prompt, rng, util)
        if made is None:
            return None
        kw, text = made
        kwargs.append(kw)
    descriptions = []
    for rule_id, kw in zip(ids, kwargs):
        checker, description = _checker(registry, rule_id, kw)
        descriptions.append(description)
        if not checker.check_following(text):
            return None  # e.g. a count another rule changed: drop rather than teach a wrong format
    joiner = rng.choice([" ", "\n\n"])
    return {"prompt": prompt.rstrip() + joiner + " ".join(descriptions), "answer": text,
            "instruction_id_list": ids, "kwargs": kwargs}


def obeyed(text: str, instruction_ids: list[str], kwargs: list[dict]) -> list[bool]:
    """Whether ``text`` obeys each constraint, checked by lm-eval's IFEval code (its strict check)."""
    registry, _, _ = ifeval_instructions()
    out = []
    for rule_id, kw in zip(instruction_ids, kwargs, strict=True):
        checker, _ = _checker(registry, rule_id, kw)
        out.append(bool(text.strip()) and bool(checker.check_following(text)))
    return out


def _constrained(examples: list[dict], rng: random.Random, max_constraints: int) -> Iterator[tuple[dict, dict]]:
    """``(example, constrain(...))`` for the single-turn ``examples`` in a seeded random order, skipping those no
    drawn constraint could be verified on."""
    for ex in rng.sample(examples, len(examples)):
        c = constrain(ex["prompt"][-1]["content"], ex["completion"][0]["content"], rng, max_constraints)
        if c is not None:
            yield ex, c


def _user_turn(ex: dict, c: dict) -> list[dict]:
    return ex["prompt"][:-1] + [{"role": "user", "content": c["prompt"]}]


def _spec(c: dict) -> str:
    return json.dumps({"instruction_id_list": c["instruction_id_list"], "kwargs": c["kwargs"]})


def constrained_prompts(examples: list[dict], n: int, rng: random.Random, max_constraints: int = 2) -> list[dict]:
    """Up to ``n`` single-turn ``examples`` (prompt/completion) as ``{"prompt", "constraints"}``: the user turn with
    1..max constraints appended (sized to the example's own answer, as ``constrain`` does), and the constraints as
    JSON ``{"instruction_id_list", "kwargs"}`` for ``obeyed``. The answer itself is dropped: RL samples its own."""
    return [{"prompt": _user_turn(ex, c), "constraints": _spec(c)}
            for ex, c in islice(_constrained(examples, rng, max_constraints), n)]


def constraint_pairs(examples: list[dict], n: int, rng: random.Random, max_constraints: int = 2,
                     source: str = "format_constraints") -> list[dict]:
    """Up to ``n`` preference pairs from single-turn ``examples``: the user turn with 1..max constraints appended,
    chosen = the answer rewritten to obey them, rejected = the example's own answer, which breaks at least one of
    them (an answer that already obeys all is skipped). The two answers differ in the format only, so DPO on them
    learns the format (Tulu 3's verifiable-instruction preference pairs). ``constraints`` is the JSON spec."""
    pairs = ({"prompt": _user_turn(ex, c), "chosen": [{"role": "assistant", "content": c["answer"]}],
              "rejected": ex["completion"][:1], "source": source, "constraints": _spec(c)}
             for ex, c in _constrained(examples, rng, max_constraints)
             if not all(obeyed(ex["completion"][0]["content"], c["instruction_id_list"], c["kwargs"])))
    return list(islice(pairs, n))
