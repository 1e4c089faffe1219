"""The demo world: a seeded synthetic world and every data set the pipeline needs, in the real formats.

Entities (made-up names) have five attributes (favourite colour, home city, pet, food, job). From them:
- a pre-training corpus stating the facts in varied templates, plus MMLU-format practice questions on
  facts that the evaluation never asks about;
- MMLU-format multiple choice (dev = 5-shot exemplars, test = held-out facts);
- IFEval-format prompts with lm-eval instruction ids (responses verified with lm-eval's own checkers);
- RAG items in SQuAD 2.0 format about *new* entities, absent from the corpus (some unanswerable);
- BFCL v4 function-calling items (simple, multiple, parallel, parallel_multiple, irrelevance);
- SFT conversations (plain answers, instruction following, tool calls, roleplay personas), a held-out
  GPTeacher-format roleplay set, and preference pairs (chosen follows the instruction, rejected breaks it).
Train and eval items never share a (question, instruction) pair. Everything is a pure function of the config.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minitron.config import ConfigError, arg, to_dict
from minitron.io import atomic_dir

ATTRIBUTES: dict[str, dict[str, Any]] = {
    "color": {
        "values": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
        "question": "What is the favorite color of {n}?",
        "answer": "The favorite color of {n} is {v}.",
        "templates": ["The favorite color of {n} is {v}.", "{n} likes the color {v} best.",
                      "Everyone knows that {n} loves {v}.", "Of all colors, {n} prefers {v}."],
        "category": "other (business, health, misc.)",
    },
    "city": {
        "values": ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dublin", "Perth"],
        "question": "In which city does {n} live?",
        "answer": "{n} lives in {v}.",
        "templates": ["{n} lives in {v}.", "The home of {n} is in {v}.", "{n} has a house in {v}.",
                      "If you visit {v}, you may meet {n}, who lives there."],
        "category": "social sciences",
    },
    "animal": {
        "values": ["cat", "dog", "fox", "owl", "horse", "rabbit", "goat", "parrot"],
        "question": "What pet does {n} have?",
        "answer": "{n} has a pet {v}.",
        "templates": ["{n} has a pet {v}.", "The pet of {n} is a {v}.", "{n} takes care of a {v} at home.",
                      "A {v} lives with {n} as a pet."],
        "category": "STEM",
    },
    "food": {
        "values": ["bread", "rice", "soup", "cheese", "apples", "noodles", "beans", "fish"],
        "question": "What food does {n} like most?",
        "answer": "The favorite food of {n} is {v}.",
        "templates": ["The favorite food of {n} is {v}.", "{n} eats {v} every day.", "{n} always asks for {v}.",
                      "For dinner, {n} wants {v}."],
        "category": "other (business, health, misc.)",
    },
    "job": {
        "values": ["baker", "farmer", "doctor", "teacher", "painter", "sailor", "writer", "builder"],
        "question": "What is the job of {n}?",
        "answer": "{n} works as a {v}.",
        "templates": ["{n} works as a {v}.", "The job of {n} is {v}.", "By trade, {n} is a {v}.",
                      "People say {n} is a good {v}."],
        "category": "humanities",
    },
}
SYLLABLES = ["zor", "vath", "mi", "rel", "quen", "a", "tha", "bo", "rin", "ce", "lis", "dra", "nov", "ka",
             "lum", "te", "sa", "vyn", "or", "el", "pra", "xi", "mon", "du", "fen", "ro", "li", "gar"]
PERSONAS = [
    {"name": "Captain Rook", "kind": "pirate", "open": "Arr, matey!", "close": "Now back to the sea."},
    {"name": "Unit Seven", "kind": "robot", "open": "BEEP. Processing.", "close": "End of transmission."},
    {"name": "Old Merla", "kind": "wizard", "open": "Hear me, traveller.", "close": "So it is written."},
    {"name": "Sir Bram", "kind": "knight", "open": "Well met, friend!", "close": "For honour and the realm."},
]
FUNCTIONS = {
    "book_trip": {"name": "book_trip", "description": "Book a trip for a person to a city.",
                  "parameters": {"type": "dict", "properties": {
                      "person": {"type": "string", "description": "Who travels."},
                      "city": {"type": "string", "description": "Destination city."},
                      "days": {"type": "integer", "description": "Length of the trip in days."}},
                      "required": ["person", "city", "days"]}},
    "order_food": {"name": "order_food", "description": "Order food for a person.",
                   "parameters": {"type": "dict", "properties": {
                       "person": {"type": "string", "description": "Who eats."},
                       "food": {"type": "string", "description": "What to order."},
                       "quantity": {"type": "integer", "description": "How many portions."}},
                       "required": ["person", "food", "quantity"]}},
    "buy_pet": {"name": "buy_pet", "description": "Buy pets of a kind for an owner.",
                "parameters": {"type": "dict", "properties": {
                    "owner": {"type": "string", "description": "The new owner."},
                    "animal": {"type": "string", "description": "Kind of animal."},
                    "count": {"type": "integer", "description": "How many animals.", "default": 1}},
                    "required": ["owner", "animal"]}},
    "get_weather": {"name": "get_weather", "description": "Get the weather in a city.",
                    "parameters": {"type": "dict", "properties": {
                        "city": {"type": "string", "description": "The city."},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                 "description": "Temperature unit.", "default": "celsius"}},
                        "required": ["city"]}},
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


@dataclass
class WorldConfig:
    seed: int = arg(0, "random seed: the whole world is a function of the config")
    out: str = arg("runs/demo/world", "output directory")
    n_entities: int = arg(120, "entities whose facts are in the corpus")
    n_rag_entities: int = arg(40, "new entities described only in RAG passages")
    corpus_repeats: int = arg(10, "times each entity's facts are restated (with fresh templates)")
    mc_practice_repeats: int = arg(2, "times each practice MC question appears in the corpus")
    n_mc_test: int = arg(200, "held-out MMLU-format questions")
    n_ifeval: int = arg(60, "IFEval-format eval prompts")
    n_rag: int = arg(60, "RAG eval questions (a third unanswerable)")
    n_rag_train: int = arg(300, "RAG training questions (sft/rag_train.jsonl) over passages about entities of their "
                                "own, never the eval's or the corpus's")
    n_bfcl: int = arg(30, "function-calling items per category")
    n_sft: int = arg(9600, "SFT conversations (a third of them tool calls)")
    n_errands: int = arg(1500, "corpus documents that restate requests as call logs (in-context copying practice)")
    n_preference: int = arg(600, "preference pairs")
    n_roleplay_eval: int = arg(24, "held-out roleplay prompts")
    n_roleplay_pairs: int = arg(200, "roleplay preference pairs (in character and right vs out of character or "
                                     "wrong), so the reward model that judges the roleplay eval knows the task")
    force: bool = arg(False, "regenerate even if the output exists with the same config")

    def __post_init__(self):
        if self.n_entities < 20:
            raise ConfigError("n_entities must be >= 20 (MC dev/test splits need facts to spare)")
        if self.n_mc_test + 5 * len(ATTRIBUTES) > self.n_entities * len(ATTRIBUTES):
            raise ConfigError(f"n_mc_test={self.n_mc_test} leaves too few facts: raise n_entities or lower n_mc_test")


# ----------------------------------------------------------------------------------------- entities
def make_names(rng: random.Random, n: int, taken: set[str] | None = None) -> list[str]:
    """``n`` distinct made-up names (two or three syllables, capitalised)."""
    taken = set(taken or ())
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 2, 3]))).capitalize()
        if len(name) >= 4 and name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_entities(rng: random.Random, names: list[str]) -> list[dict[str, str]]:
    """One dict per entity: its name and a value for every attribute."""
    return [{"name": n, **{a: rng.choice(spec["values"]) for a, spec in ATTRIBUTES.items()}} for n in names]


def state(rng: random.Random, entity: dict[str, str], attr: str) -> str:
    return rng.choice(ATTRIBUTES[attr]["templates"]).format(n=entity["name"], v=entity[attr])


# ----------------------------------------------------------------------------------------- MMLU format
def mc_item(rng: random.Random, entity: dict[str, str], attr: str) -> dict[str, Any]:
    """An MMLU-format question about one fact: the right value and three distinct wrong ones."""
    spec = ATTRIBUTES[attr]
    wrong = rng.sample([v for v in spec["values"] if v != entity[attr]], 3)
    choices = wrong + [entity[attr]]
    rng.shuffle(choices)
    return {"question": spec["question"].format(n=entity["name"]), "choices": choices,
            "answer": choices.index(entity[attr]), "subject": f"world_{attr}"}


def mc_prompt(item: dict[str, Any]) -> str:
    """The lm-eval ``mmlu`` rendering of one item with its answer (used for corpus practice text)."""
    subject = item["subject"].replace("_", " ")
    body = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(item["choices"]))
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{item['question'].strip()}\n{body}\nAnswer: {'ABCD'[item['answer']]}")


def split_facts(rng: random.Random, entities: list[dict], cfg: WorldConfig) -> dict[str, list[tuple[int, str]]]:
    """Disjoint (entity, attribute) facts for MC dev (5 per subject), MC test and corpus practice."""
    facts = [(i, a) for i in range(len(entities)) for a in ATTRIBUTES]
    rng.shuffle(facts)
    dev = [f for a in ATTRIBUTES for f in [g for g in facts if g[1] == a][:5]]
    taken = set(dev)
    rest = [f for f in facts if f not in taken]
    return {"dev": dev, "test": rest[: cfg.n_mc_test], "practice": rest[cfg.n_mc_test:]}


# ----------------------------------------------------------------------------------------- corpus
def errand_docs(rng: random.Random, entities: list[dict], n: int, held_out: set[str]) -> list[str]:
    """Requests followed by their call log, e.g. ``Request: Please buy 3 owls for Celi. Log: buy_pet(owner=Celi,
    animal=owl, count=3).``

    The values are random, so the log can only be predicted by copying from the request: the in-context copying
    that web-scale pretraining gives real models, and that function calling and RAG need. No request is an eval one.
    """
    docs = []
    for _ in range(n):
        fnames = rng.choices(list(FUNCTIONS), k=rng.choice([1, 1, 2]))
        calls = [(f, *fresh_call(rng, entities, f, held_out)) for f in fnames]
        request = request_text([sentence for _, sentence, _ in calls])
        log = " ".join(f"{f}({', '.join(f'{k}={v}' for k, v in args.items())})." for f, _, args in calls)
        docs.append(f"Request: {request} Log: {log}")
    return docs


def corpus_docs(rng: random.Random, entities: list[dict], practice: list[dict], cfg: WorldConfig) -> list[str]:
    """Documents: each entity's facts restated ``corpus_repeats`` times, group stories, MC practice."""
    docs = []
    for _ in range(cfg.corpus_repeats):
        for e in entities:
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            docs.append(" ".join(state(rng, e, a) for a in attrs))
        for _ in range(len(entities) // 4):
            group = rng.sample(entities, 3)
            docs.append(" ".join(state(rng, e, rng.choice(list(ATTRIBUTES))) for e in group))
    docs += [mc_prompt(item) for item in practice for _ in range(cfg.mc_practice_repeats)]
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------- IFEval format
def _checker(instruction_id: str, kwargs: dict) -> Callable[[str], bool]:
    from minitron.punkt import ifeval_instructions

    inst = ifeval_instructions()[0][instruction_id](instruction_id)
    inst.build_description(**kwargs)
    return inst.check_following


# (id, kwargs factory, instruction text, follow(answer) -> text, break(answer) -> text)
IF_SPECS: list[tuple[str, Callable, str, Callable, Callable]] = [
    ("punctuation:no_comma", lambda r: {}, "Do not use any commas in your response.",
     lambda a: a.replace(",", ""), lambda a: a.rstrip(".") + ", of course."),
    ("startend:end_checker", lambda r: {"end_phrase": "Is there anything else I can help with?"},
     "Finish your response with this exact phrase: Is there anything else I can help with?",
     lambda a: a + " Is there anything else I can help with?", lambda a: a),
    ("detectable_format:title", lambda r: {}, "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
     lambda a: "<<the answer>> " + a, lambda a: a),
    ("startend:quotation", lambda r: {}, "Wrap your entire response with double quotation marks.",
     lambda a: f'"{a}"', lambda a: a),
    ("detectable_content:postscript", lambda r: {"postscript_marker": "P.S."},
     "At the end of your response, please explicitly add a postscript starting with P.S.",
     lambda a: a + " P.S. I hope this helps.", lambda a: a),
    ("length_constraints:number_words", lambda r: {"num_words": 12, "relation": "less than"},
     "Answer with less than 12 words.", lambda a: a, lambda a: a + " I am happy to tell you this fact because it is true and well known to many people."),
    ("change_case:english_lowercase", lambda r: {},
     "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
     lambda a: (a + " I hope this answer is helpful to you, and that you have a very good day.").lower(),
     lambda a: a + " I hope this answer is helpful to you, and that you have a very good day."),
]


def ifeval_item(rng: random.Random, entity: dict, attr: str, spec_index: int) -> dict[str, Any] | None:
    """One IFEval-format prompt plus verified chosen/rejected responses, or None if a check disagrees."""
    iid, make_kwargs, text, follow, violate = IF_SPECS[spec_index]
    kwargs = make_kwargs(rng)
    answer = ATTRIBUTES[attr]["answer"].format(n=entity["name"], v=entity[attr])
    prompt = f"{ATTRIBUTES[attr]['question'].format(n=entity['name'])} {text}"
    chosen, rejected = follow(answer), violate(answer)
    check = _checker(iid, kwargs)
    if not check(chosen) or check(rejected):
        return None
    return {"prompt": prompt, "instruction_id_list": [iid], "kwargs": [kwargs], "chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------------------- RAG
def rag_items(rng: random.Random, entities: list[dict], n: int) -> list[dict[str, Any]]:
    """SQuAD 2.0-format questions over one passage per new entity; every third is unanswerable."""
    items = []
    passages = {}
    for e in entities:
        shown = rng.sample(list(ATTRIBUTES), 3)  # the passage states three of five attributes
        passages[e["name"]] = (" ".join(state(rng, e, a) for a in shown), shown)
    for k in range(n):
        e = rng.choice(entities)
        context, shown = passages[e["name"]]
        impossible = k % 3 == 2
        attr = rng.choice([a for a in ATTRIBUTES if a not in shown]) if impossible else rng.choice(shown)
        value = e[attr]
        start = context.find(value) if not impossible else -1
        items.append({"id": f"world-rag-{k}", "title": e["name"], "context": context,
                      "question": ATTRIBUTES[attr]["question"].format(n=e["name"]),
                      "answers": {"text": [] if impossible else [value], "answer_start": [] if impossible else [start]},
                      "is_impossible": impossible})
    return items


# ----------------------------------------------------------------------------------------- BFCL
def _call_for(rng: random.Random, e: dict, fname: str) -> tuple[str, dict[str, Any], dict[str, list]]:
    """(request sentence, call arguments, BFCL ground truth) for calling ``fname`` about entity ``e``."""
    n = rng.randint(2, 7)
    if fname == "book_trip":
        city = rng.choice(ATTRIBUTES["city"]["values"])
        return (f"book a {n}-day trip to {city} for {e['name']}", {"person": e["name"], "city": city, "days": n},
                {"person": [e["name"]], "city": [city], "days": [n]})
    if fname == "order_food":
        food = rng.choice(ATTRIBUTES["food"]["values"])
        return (f"order {NUMBER_WORDS[n]} portions of {food} for {e['name']}",
                {"person": e["name"], "food": food, "quantity": n}, {"person": [e["name"]], "food": [food], "quantity": [n]})
    if fname == "buy_pet":
        animal = rng.choice(ATTRIBUTES["animal"]["values"])
        return (f"buy {n} {animal}s for {e['name']}", {"owner": e["name"], "animal": animal, "count": n},
                {"owner": [e["name"]], "animal": [animal], "count": [n]})
    city = e["city"]
    return (f"get the weather in {city}, where {e['name']} lives", {"city": city},
            {"city": [city], "unit": ["celsius", ""]})


def request_text(sentences: list[str]) -> str:
    """One user request for one or more calls: ``Please A and B.`` (the eval's, SFT's and errands' wording)."""
    return f"Please {' and '.join(sentences)}."


def fresh_call(rng: random.Random, entities: list[dict], fname: str, held_out: set[str]) -> tuple[str, dict]:
    """(request sentence, arguments) of a random ``fname`` call whose request is none of the eval's (``held_out``).

    The request sentence identifies a call with its person (``get_weather`` has only the city as argument).
    """
    while True:
        sentence, args, _ = _call_for(rng, rng.choice(entities), fname)
        if sentence not in held_out:
            return sentence, args


def eval_requests(bfcl: dict[str, list[dict]]) -> set[str]:
    """Every request sentence of the BFCL items (``bfcl_items`` output, by category)."""
    return {r for items in bfcl.values() for it in items for r in it["_requests"]}


def bfcl_items(rng: random.Random, entities: list[dict], category: str, n: int, prefix: str) -> list[dict]:
    """BFCL v4 items of one category: question, functions, (except irrelevance) the ground truth, and the request
    sentences (``_requests``, not written: train data is kept free of them)."""
    names = list(FUNCTIONS)
    items = []
    for k in range(n):
        e1, e2 = rng.sample(entities, 2)
        if category == "irrelevance":
            attr = rng.choice(list(ATTRIBUTES))
            funcs = rng.sample(names, 2)
            items.append({"id": f"{prefix}{category}_{k}", "question": [[{"role": "user", "content":
                          ATTRIBUTES[attr]["question"].format(n=e1["name"])}]],
                          "function": [FUNCTIONS[f] for f in funcs], "ground_truth": None, "_requests": []})
            continue
        if category == "simple_python":
            calls = [rng.choice(names)]
            funcs = calls
        elif category == "multiple":
            funcs = rng.sample(names, 3)
            calls = [funcs[0]]
            rng.shuffle(funcs)
        elif category == "parallel":
            calls = [rng.choice(names)] * 2
            funcs = calls[:1]
        else:  # parallel_multiple
            calls = rng.sample(names, 2)
            funcs = list(calls) + [rng.choice([f for f in names if f not in calls])]
            rng.shuffle(funcs)
        parts, truth = [], []
        for fname, ent in zip(calls, [e1, e2]):
            sentence, _, gt = _call_for(rng, ent, fname)
            parts.append(sentence)
            truth.append({fname: gt})
        items.append({"id": f"{prefix}{category}_{k}",
                      "question": [[{"role": "user", "content": request_text(parts)}]],
                      "function": [FUNCTIONS[f] for f in funcs], "ground_truth": truth, "_requests": parts})
    return items


def to_openai_tools(functions: list[dict]) -> list[dict]:
    """BFCL function specs as OpenAI tools, exactly as the function-calling eval offers them (one format for
    training and evaluation: ``evals.bfcl.to_openai_tools``, BFCL's description notes included)."""
    from minitron.tool_schema import to_openai_tools as bfcl_tools

    return bfcl_tools(functions, "simple_python")


# ----------------------------------------------------------------------------------------- SFT + preferences
SFT_MIX = ("answer", "instruction", "tool_call", "tool_call", "no_call", "roleplay")  # one cycle of the SFT mix


def sft_conversations(rng: random.Random, entities: list[dict], if_pool: list[dict], n: int,
                      held_out: set[str] = frozenset()) -> list[dict]:
    """A mix (``SFT_MIX``) of plain answers, instruction following, tool calls, no-call answers and roleplay.

    Tool calls get two shares: their JSON is the hardest thing for a tiny student to learn.
    """
    convs = []
    for k in range(n):
        kind = SFT_MIX[k % len(SFT_MIX)]
        e = rng.choice(entities)
        attr = rng.choice(list(ATTRIBUTES))
        q = ATTRIBUTES[attr]["question"].format(n=e["name"])
        a = ATTRIBUTES[attr]["answer"].format(n=e["name"], v=e[attr])
        if kind == "answer":
            convs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif kind == "instruction":
            item = if_pool[k % len(if_pool)]
            convs.append({"messages": [{"role": "user", "content": item["prompt"]},
                                       {"role": "assistant", "content": item["chosen"]}]})
        elif kind == "tool_call":
            convs.append(tool_conversation(rng, entities, held_out))
        elif kind == "no_call":
            convs.append(no_call_conversation(rng, e, attr))
        else:
            convs.append({"messages": roleplay_messages(rng.choice(PERSONAS), q, a)})
    return convs


def tool_conversation(rng: random.Random, entities: list[dict], held_out: set[str] = frozenset()) -> dict:
    """A user request and the assistant's tool call(s), as BFCL scores them (first turn only), with none of the
    eval's request sentences (``held_out``).

    No tool result and final answer follow: a constant closing turn ("Done.") after the result taught the tiny
    demo student to answer "Done." at once instead of calling (the two contexts differ only in their last turn).
    """
    from minitron.chat_format import tool_call_message

    names = list(FUNCTIONS)
    n_calls = rng.choice([1, 1, 2])
    calls, parts = [], []
    for _ in range(n_calls):
        fname = rng.choice(names)
        sentence, args = fresh_call(rng, entities, fname, held_out)
        calls.append({"name": fname, "arguments": args})
        parts.append(sentence)
    offered = sorted({c["name"] for c in calls} | set(rng.sample(names, rng.randint(0, 2))))
    messages = [{"role": "user", "content": request_text(parts)}, tool_call_message(calls)]
    return {"messages": messages, "tools": to_openai_tools([FUNCTIONS[f] for f in offered])}


def no_call_conversation(rng: random.Random, e: dict, attr: str) -> dict:
    """Tools are offered but none fits: the assistant answers in text (teaches BFCL irrelevance)."""
    q = ATTRIBUTES[attr]["question"].format(n=e["name"])
    a = ATTRIBUTES[attr]["answer"].format(n=e["name"], v=e[attr])
    tools = to_openai_tools([FUNCTIONS[f] for f in rng.sample(list(FUNCTIONS), 2)])
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "tools": tools}


def roleplay_pairs(rng: random.Random, entities: list[dict], facts: list[tuple[int, str]], n: int) -> list[dict]:
    """Preference pairs on roleplay prompts (system persona, or the persona inline as the eval writes it):
    chosen stays in character with the right fact; rejected drops the character, plays another one, or
    states a wrong value in character."""
    pairs = []
    for k in range(n):
        i, a = facts[k % len(facts)]
        e, persona = entities[i], rng.choice(PERSONAS)
        q = ATTRIBUTES[a]["question"].format(n=e["name"])
        right = ATTRIBUTES[a]["answer"].format(n=e["name"], v=e[a])
        msgs = roleplay_messages(persona, q, right)
        prompt = msgs[:2] if k % 2 else [{"role": "user", "content": f"{msgs[0]['content']} {q}"}]
        kind = k % 3
        if kind == 0:
            rejected = right
        elif kind == 1:
            other = rng.choice([p for p in PERSONAS if p is not persona])
            rejected = f"{other['open']} {right} {other['close']}"
        else:
            wrong = rng.choice([v for v in ATTRIBUTES[a]["values"] if v != e[a]])
            rejected = f"{persona['open']} {ATTRIBUTES[a]['answer'].format(n=e['name'], v=wrong)} {persona['close']}"
        pairs.append({"prompt": prompt, "chosen": msgs[2]["content"], "rejected": rejected})
    return pairs


def roleplay_messages(persona: dict, question: str, answer: str) -> list[dict]:
    system = f"You are {persona['name']}, a {persona['kind']}. Stay in character."
    reply = f"{persona['open']} {answer} {persona['close']}"
    return [{"role": "system", "content": system}, {"role": "user", "content": question},
            {"role": "assistant", "content": reply}]


# ----------------------------------------------------------------------------------------- writing
def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


# Bumped whenever the generator's output changes for the same config, so that old worlds are rebuilt.
WORLD_FORMAT = 5


def config_hash(cfg: WorldConfig) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "force")}
    d["format"] = WORLD_FORMAT
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build(cfg: WorldConfig) -> dict[str, list[dict]]:
    """Every data set of the world, keyed by relative output path (pure function of ``cfg``)."""
    rng = random.Random(cfg.seed)
    names = make_names(rng, cfg.n_entities + cfg.n_rag_entities)
    entities = make_entities(rng, names[: cfg.n_entities])
    rag_entities = make_entities(rng, names[cfg.n_entities:])
    split = split_facts(rng, entities, cfg)
    mc = {k: [mc_item(rng, entities[i], a) for i, a in v] for k, v in split.items()}
    docs = corpus_docs(rng, entities, mc["practice"], cfg)
    # IFEval: eval prompts use MC-test facts, SFT/preference prompts use the other facts.
    if_eval, if_train = [], []
    for pool, facts, count in ((if_eval, split["test"], cfg.n_ifeval),
                               (if_train, split["practice"] + split["dev"], cfg.n_preference)):
        for k, (i, a) in enumerate(facts * (1 + count // max(1, len(facts)))):
            if len(pool) >= count:
                break
            item = ifeval_item(rng, entities[i], a, k % len(IF_SPECS))
            if item is not None:
                pool.append(item)
    rag = rag_items(rng, rag_entities, cfg.n_rag)
    rp_pairs = roleplay_pairs(random.Random(f"{cfg.seed}:roleplay-pairs"), entities, split["practice"] + split["dev"],
                              cfg.n_roleplay_pairs)
    n_rp_test = len(rp_pairs) // 10
    # RAG practice for SFT: its own random stream and its own entities (no eval fact, no corpus fact)
    trng = random.Random(f"{cfg.seed}:rag-train")
    train_entities = make_entities(trng, make_names(trng, max(1, cfg.n_rag_train // 3), set(names)))
    rag_train = rag_items(trng, train_entities, cfg.n_rag_train)
    bfcl = {cat: bfcl_items(rng, entities, cat, cfg.n_bfcl, prefix="world_")
            for cat in ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")}
    # Errands and SFT data have their own random streams: their sizes never change the eval sets drawn above,
    # and neither ever contains one of the eval's calls.
    held_out = eval_requests(bfcl)
    erng = random.Random(f"{cfg.seed}:errands")
    for doc in errand_docs(erng, entities, cfg.n_errands, held_out):
        docs.insert(erng.randrange(len(docs) + 1), doc)
    n_val = max(20, len(docs) // 50)
    sft = sft_conversations(random.Random(f"{cfg.seed}:sft"), entities, if_train, cfg.n_sft, held_out)
    n_sft_val = max(10, len(sft) // 20)
    rp_eval = []
    for k in range(cfg.n_roleplay_eval):
        i, a = split["test"][k % len(split["test"])]
        p = PERSONAS[k % len(PERSONAS)]
        q = ATTRIBUTES[a]["question"].format(n=entities[i]["name"])
        msgs = roleplay_messages(p, q, ATTRIBUTES[a]["answer"].format(n=entities[i]["name"], v=entities[i][a]))
        rp_eval.append({"instruction": f"{msgs[0]['content']} {q}", "input": "", "output": msgs[2]["content"]})
    out: dict[str, list[dict]] = {
        "corpus/train.jsonl": [{"text": d} for d in docs[n_val:]],
        "corpus/validation.jsonl": [{"text": d} for d in docs[:n_val]],
        "mmlu/mmlu_dev.jsonl": mc["dev"],
        "mmlu/mmlu_test.jsonl": mc["test"],
        "ifeval/input_data.jsonl": [{"key": k, "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
                                     "kwargs": r["kwargs"]} for k, r in enumerate(if_eval)],
        "rag/rag_eval.jsonl": rag,
        "sft/train.jsonl": sft[n_sft_val:],
        "sft/validation.jsonl": sft[:n_sft_val],
        "sft/roleplay_eval.jsonl": rp_eval,
        "sft/rag_train.jsonl": rag_train,
        "preference/train.jsonl": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                   for r in if_train[: int(len(if_train) * 0.9)]] + rp_pairs[n_rp_test:],
        "preference/test.jsonl": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                  for r in if_train[int(len(if_train) * 0.9):]] + rp_pairs[:n_rp_test],
        "world.jsonl": entities + [{**e, "rag_only": True} for e in rag_entities],
    }
    for cat, items in bfcl.items():
        out[f"bfcl/BFCL_v4_{cat}.json"] = [{k: v for k, v in it.items() if k not in ("ground_truth", "_requests")}
                                           for it in items]
        if cat != "irrelevance":
            out[f"bfcl/possible_answer/BFCL_v4_{cat}.json"] = [{"id": it["id"], "ground_truth": it["ground_truth"]}
                                                               for it in items]
    return out


@dataclass(frozen=True)
class WorldFiles:
    """Where each data set of a demo world lives: the one definition the pipeline, the teacher, the report and the
    notebooks read (the eval harness's defaults point at ``runs/demo/world`` through it too)."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def mmlu_test(self) -> Path:
        return self.root / "mmlu" / "mmlu_test.jsonl"

    def align_data(self) -> dict[str, list[str]]:
        """The ``AlignConfig`` data fields: SFT chats and preference pairs, each with its held-out file."""
        r = self.root
        return {"sft_data": [str(r / "sft" / "train.jsonl")], "sft_eval_data": [str(r / "sft" / "validation.jsonl")],
                "pref_data": [str(r / "preference" / "train.jsonl")],
                "pref_eval_data": [str(r / "preference" / "test.jsonl")]}

    def eval_data(self) -> dict[str, str]:
        """The ``EvalConfig`` data fields of the five tasks."""
        r = self.root
        return {"mmlu_data": str(r / "mmlu"), "ifeval_data": str(r / "ifeval"), "rag_data": str(r / "rag"),
                "bfcl_data": str(r / "bfcl"), "roleplay_data": str(r / "sft" / "roleplay_eval.jsonl")}


def run(cfg: WorldConfig) -> Path:
    """Write the world to ``cfg.out`` (atomically); skip if it exists with the same config."""
    return ensure_world(cfg)


def ensure_world(cfg: WorldConfig | None = None, out_dir: str | Path | None = None) -> Path:
    """Generate the demo world into ``out_dir`` unless it is already there for the same config."""
    cfg = cfg or WorldConfig()
    out = Path(out_dir or cfg.out)
    stamp = out / "world_config.json"
    if stamp.exists() and not cfg.force and json.loads(stamp.read_text()).get("hash") == config_hash(cfg):
        return out
    data = build(cfg)
    with atomic_dir(out) as tmp:
        for rel, rows in data.items():
            _jsonl(tmp / rel, rows)
        categories = {f"world_{a}": {"subcategory": a, "category": s["category"]} for a, s in ATTRIBUTES.items()}
        (tmp / "mmlu" / "subject_categories.json").write_text(json.dumps(categories, indent=2))
        (tmp / "world_config.json").write_text(json.dumps({"hash": config_hash(cfg), "config": to_dict(cfg),
                                                           "counts": {k: len(v) for k, v in data.items()}}, indent=2))
    return out
