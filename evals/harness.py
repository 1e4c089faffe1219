"""``minitron eval``: score models on MMLU, IFEval, RAG, function calling (BFCL) and roleplay, the same way
in-process or through a served endpoint, into one table with plots.

Usage::

    minitron eval --model runs/demo/teacher --model runs/demo/width/distilled --suite demo --out runs/demo/eval
    minitron eval --endpoint http://127.0.0.1:8000 --suite mmlu,ifeval --limit 20 --out runs/eval-served
    minitron eval --config configs/eval/full.yaml --model runs/demo/teacher --limit 10

Suites: ``demo`` (the demo world's data under ``runs/demo/world``, small default limits: four tiny models in a
few minutes on two cores), ``full`` (``../shared/data``), or a comma list of tasks (``mmlu,ifeval,rag,bfcl,
roleplay``) on the demo world's data (``full:mmlu,rag`` on the real data). Any task's data can be pointed
elsewhere (``--mmlu-data DIR`` ...).
``--limit N`` caps the items per task (per MMLU subject and per BFCL category, as lm-eval does for groups).

Outputs in ``--out``: ``results.json`` (every metric with n and standard error), ``report.md`` (one row per model,
with parameter counts), ``plots/*.png`` (a bar chart per metric, and the stage progression), ``items/<model>/
<task>.jsonl`` (per-item records) and ``cache/`` (every generation and score, so an interrupted run resumes).

Every input is checked before any work (each data file parsed, each tokenizer and chat template loaded, each
endpoint reached): a bad one is refused in one line naming the cause and the fix, and nothing is written. A server
that dies mid-eval is one such line too; the rerun reads every finished item back from ``cache/``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evals.cache import ItemCache
from evals.generate import EndpointBackend, EvalError, Generator, HFBackend
from evals.results import HEADLINE, mean_metric, metric_columns, write_report
from minitron import fingerprint
from minitron.config import ConfigError, arg, to_dict
from minitron.io import write_text
from minitron.model_source import resolve_model
from minitron.weights import stored_parameters
from minitron.world import WorldFiles

TASKS = ("mmlu", "mmlu_cloze", "ifeval", "rag", "bfcl", "roleplay")
DEFAULT_TASKS = ("mmlu", "ifeval", "rag", "bfcl", "roleplay")  # what ``demo`` and ``full`` run
CHAT_TASKS = ("ifeval", "rag", "bfcl", "roleplay")  # prompts rendered by the chat template
DATA_OF = {"mmlu_cloze": "mmlu"}  # tasks that read another task's data, limit and --<task>-data flag
WORLD, SHARED = "runs/demo/world", "../shared/data"
# suite -> (data per task, default item limit per task, default generation lengths)
SUITES: dict[str, dict[str, Any]] = {
    "demo": {"data": {k.removesuffix("_data"): v for k, v in WorldFiles(Path(WORLD)).eval_data().items()},
             # every item the demo world makes: 200 MC (40 per subject), 60 IFEval, 60 RAG, 150 FC, 24 roleplay
             "limit": {"mmlu": 40, "ifeval": 60, "rag": 60, "bfcl": 30, "roleplay": 24},
             "ifeval_max_new_tokens": 64, "judge_model": "runs/demo/aligned/rm"},
    "full": {"data": {"mmlu": f"{SHARED}/mmlu", "ifeval": f"{SHARED}/ifeval", "rag": f"{SHARED}/rag",
                      "bfcl": f"{SHARED}/bfcl", "roleplay": f"{SHARED}/sft/gpteacher_roleplay.jsonl"},
             "limit": {}, "ifeval_max_new_tokens": 1280, "judge_model": None},
}
console = Console(stderr=True)


@dataclasses.dataclass
class EvalConfig:
    """Evaluate model dirs (or one endpoint) on a suite of tasks; write JSON, Markdown and plots."""

    model: list[str] = arg([], "model dirs, in stage order (teacher, pruned, distilled, aligned); repeat --model")
    names: list[str] = arg([], "display names of the models (default: their paths below a common parent)")
    endpoint: str | None = arg(None, "OpenAI-compatible server URL to evaluate instead of --model dirs")
    endpoint_model: str | None = arg(None, "model id on the endpoint (default: the first one it serves)")
    tokenizer: str | None = arg(None, "tokenizer dir for --endpoint (default: the served model id when it is a dir)")
    endpoint_api_key: str | None = arg(None, "bearer key for --endpoint / --judge-endpoint (default: $OPENAI_API_KEY)")
    suite: str = arg("demo", "demo | full | tasks (mmlu,ifeval,rag,bfcl,roleplay) on the demo data | full:tasks")
    out: str = arg("runs/demo/eval", "output folder (results.json, report.md, plots/, items/, cache/)")
    limit: int | None = arg(None, "items per task (per MMLU subject / BFCL category); default: the suite's")
    mmlu_data: str | None = arg(None, "MMLU data dir (mmlu_{test,dev}.jsonl, subject_categories.json) or 'hub'")
    ifeval_data: str | None = arg(None, "IFEval dir with input_data.jsonl")
    rag_data: str | None = arg(None, "RAG data: SQuAD 2.0 / NQ-open JSONL file or dir")
    bfcl_data: str | None = arg(None, "BFCL dir (BFCL_v4_<category>.json + possible_answer/)")
    roleplay_data: str | None = arg(None, "GPTeacher roleplay JSONL (instruction, input, output)")
    batch_size: int = arg(16, "prompts per generation / scoring batch")
    num_fewshot: int = arg(5, "MMLU shots")
    ifeval_max_new_tokens: int | None = arg(None, "IFEval reply length cap (default: demo 64, full 1280 as lm-eval)")
    rag_top_k: int = arg(3, "passages retrieved into the RAG prompt")
    rag_retriever: str = arg("bm25", "bm25 | dense")
    rag_dense_model: str | None = arg(None, "encoder dir for dense retrieval (default: the evaluated model)")
    rag_max_new_tokens: int = arg(32, "RAG answer length cap")
    bfcl_max_new_tokens: int = arg(128, "function-calling reply length cap")
    bfcl_lenient: bool = arg(False, "BFCL: also accept python-fenced answers (BFCL fails them); accuracy_strict beside")
    roleplay_max_new_tokens: int = arg(96, "roleplay reply length cap")
    roleplay_baseline: str = arg("first", "first (the first model) | reference (the data's outputs) | a model dir")
    judge_endpoint: str | None = arg(None, "OpenAI-compatible judge for roleplay (pairwise, both orders)")
    judge_endpoint_model: str | None = arg(None, "model id of the judge endpoint")
    judge_model: str | None = arg(None, "reward model dir as the offline roleplay judge (demo: runs/demo/aligned/rm)")
    device: str | None = arg(None, "cpu | cuda (default: cuda when available)")
    dtype: str = arg("auto", "weights dtype of in-process models: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 "
                             "(~2x faster generation on CPUs with AMX; scores shift slightly: say which in reports)")
    plots: bool = arg(True, "write PNG plots")
    attributes: str | None = arg(None, "SteerLM: ask for these attributes (e.g. 'verbosity=0 helpfulness=4', 0-4) by "
                                       "the system line 'Attributes: ...' in every chat prompt (BFCL, RAG, roleplay; "
                                       "not the lm-eval tasks MMLU and IFEval)")

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if bool(self.model) == bool(self.endpoint):
            raise ConfigError("pass either --model DIR (repeatable) or --endpoint URL")
        if self.attributes:
            from minitron.chat_format import parse_attributes

            try:
                parse_attributes(self.attributes)
            except ValueError as e:
                raise ConfigError(f"--attributes: {e}") from None
        if self.names and len(self.names) != len(self.model):
            raise ConfigError(f"--names has {len(self.names)} entries for {len(self.model)} models")
        bad = [t for t in self.tasks() if t not in TASKS]
        if bad:
            raise ConfigError(f"unknown tasks {bad}: --suite is demo, full or a comma list of {', '.join(TASKS)}")
        if self.rag_retriever not in ("bm25", "dense"):
            raise ConfigError("--rag-retriever is bm25 or dense")

    def tasks(self) -> list[str]:
        """The suite's tasks: all for ``demo``/``full``, else the comma list (after an optional ``full:``)."""
        listed = self.suite.split(":", 1)[-1]
        return list(DEFAULT_TASKS) if listed in SUITES else [t.strip() for t in listed.split(",") if t.strip()]

    def preset(self) -> dict[str, Any]:
        """Data paths and limits: ``full`` for ``full`` / ``full:tasks``, else the demo world's."""
        return SUITES["full"] if self.suite.split(":", 1)[0] == "full" else SUITES["demo"]

    def data(self, task: str) -> str:
        """The task's data path: its ``--<task>-data`` override, else the suite's (both MMLU formats: mmlu's)."""
        task = DATA_OF.get(task, task)
        return getattr(self, f"{task}_data") or self.preset()["data"][task]

    def task_limit(self, task: str) -> int | None:
        """``--limit`` when given, else the suite's default for the task (None = every item)."""
        task = DATA_OF.get(task, task)
        return self.limit if self.limit is not None else self.preset()["limit"].get(task)


def default_names(paths: list[str]) -> list[str]:
    """Short unique names: each path relative to the models' common parent (``width/distilled``)."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    names = [str(p.relative_to(common)) or p.name for p in resolved]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def make_generator(cfg: EvalConfig, model: str | EndpointBackend, cache_dir: Path) -> Generator:
    """A generator for a model dir (loaded in-process) or an endpoint's backend, with its own cache file."""
    backend = model if isinstance(model, EndpointBackend) else HFBackend(model, device=cfg.device, dtype=cfg.dtype)
    # one cache file per model *version*: the fingerprint changes when the weights do, so a retrained model
    # never reads a stale reply, while a rerun of the same model (or its reuse as roleplay baseline) does
    tmp = Generator(backend, None)
    cache = ItemCache(cache_dir / f"{backend.name}-{tmp._fp[:12]}.sqlite")
    gen = Generator(backend, cache, cfg.batch_size)
    if cfg.attributes:  # SteerLM: the attribute line joins each conversation (so the cache keys differ too)
        from minitron.chat_format import parse_attributes, with_attributes

        values, chat = parse_attributes(cfg.attributes), gen.chat

        def steered(convs: list, *args: Any, **kw: Any) -> list[str]:
            convs = [c if isinstance(c, dict) else {"messages": c} for c in convs]
            return chat([{**c, "messages": with_attributes(c["messages"], values)} for c in convs], *args, **kw)

        gen.chat = steered  # type: ignore[method-assign]
    return gen


def _bfcl(gen: Generator, data: str, limit: int | None, max_new_tokens: int, lenient: bool = False) -> dict[str, Any]:
    """BFCL through evals.bfcl: its requests and checker, our batched, cached generation."""
    from evals import bfcl

    requests = bfcl.build_requests(data, limit)
    texts = gen.chat([{"messages": r["messages"], "tools": r["tools"]} for r in requests],
                     max_new_tokens=max_new_tokens, desc="bfcl")
    res = bfcl.score_outputs(requests, texts, lenient)
    # the checker's summary recomputed as harness metrics (value, stderr, n): overall = micro over every
    # question, one acc_<category> each, and the macro average whose stderr combines the per-category ones
    metrics = {"accuracy": mean_metric([float(i["valid"]) for i in res["items"]])}
    cats = {}
    for cat in res["categories"]:
        cats[cat] = mean_metric([float(i["valid"]) for i in res["items"] if i["category"] == cat])
        metrics[f"acc_{cat}"] = cats[cat]
    se = sum(c["stderr"] ** 2 for c in cats.values()) ** 0.5 / max(len(cats), 1)
    metrics["macro_accuracy"] = {"value": res["macro_accuracy"], "stderr": se, "n": len(res["items"])}
    if lenient:  # BFCL's own (strict) figure beside the lenient one
        metrics["accuracy_strict"] = mean_metric([float(i["strict_valid"]) for i in res["items"]])
    return {"metrics": metrics, "items": res["items"]}


def run_task(task: str, gen: Generator, cfg: EvalConfig, work: Path, baseline: Any,
             judge_endpoint: EndpointBackend | None = None) -> dict[str, Any]:
    """One task on one model: ``{"metrics", "items", "note"?}``."""
    from evals import ifeval, mmlu, rag, roleplay

    data, limit = cfg.data(task), cfg.task_limit(task)
    if task in ("mmlu", "mmlu_cloze"):
        return mmlu.evaluate(gen, data, limit, work / "tasks", cfg.num_fewshot, fmt="cloze" if task == "mmlu_cloze" else "letter")
    if task == "ifeval":
        n = cfg.ifeval_max_new_tokens or cfg.preset()["ifeval_max_new_tokens"]
        return ifeval.evaluate(gen, data, limit, work / "tasks", n)
    if task == "rag":
        return rag.evaluate(gen, data, limit, cfg.rag_top_k, cfg.rag_retriever, cfg.rag_dense_model,
                            cfg.rag_max_new_tokens)
    if task == "bfcl":
        return _bfcl(gen, data, limit, cfg.bfcl_max_new_tokens, cfg.bfcl_lenient)
    # roleplay: an endpoint judge when given, else the reward model; without either it is reported as skipped
    # (a missing judge should not throw away the other tasks' numbers)
    judge_model = cfg.judge_model or cfg.preset().get("judge_model")
    judge = None
    if judge_endpoint is not None:
        judge = Generator(judge_endpoint, ItemCache(work / "cache" / "judge.sqlite"), cfg.batch_size)
    elif not (judge_model and Path(judge_model, "config.json").exists()):
        return {"metrics": {}, "items": [], "note": f"skipped: no judge (no --judge-endpoint, no reward model at {judge_model})"}
    base = baseline(gen)
    try:
        return roleplay.evaluate(gen, data, limit, base, judge, None if judge else judge_model,
                                 cfg.roleplay_max_new_tokens)
    finally:
        if isinstance(base, Generator) and base is not gen:
            base.cache.close()


def _check_data(cfg: EvalConfig) -> None:
    """Read every task's data as the task will (missing files, malformed rows: refused with file and line)."""
    from evals import bfcl, ifeval, mmlu, rag, roleplay

    read = {"mmlu": mmlu.read_data, "mmlu_cloze": mmlu.read_data, "ifeval": ifeval.read_data, "rag": rag.load_sets,
            "bfcl": lambda d: bfcl.build_requests(d, cfg.task_limit("bfcl")),
            "roleplay": lambda d: roleplay.load_prompts(d, None)}
    for task in cfg.tasks():
        d = cfg.data(task)
        if d == "hub":
            from huggingface_hub.constants import HF_HUB_OFFLINE

            if HF_HUB_OFFLINE:
                raise EvalError(f"--{DATA_OF.get(task, task)}-data hub needs the Hugging Face hub, and HF_HUB_OFFLINE "
                                "is set: pass a local data dir (e.g. ../shared/data/mmlu), or unset it")
            continue
        if not Path(d).exists():
            hint = "run `minitron world` first" if d.startswith(WORLD) else f"pass --{DATA_OF.get(task, task)}-data PATH"
            raise EvalError(f"{task}: data not found at {d} ({hint})")
        read[task](d)


def _check_tokenizer(model: str, tasks: list[str], flag: str = "--model") -> None:
    """The model's tokenizer loads, and has a chat template when a chat task is selected."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions; any failure means the same here
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise EvalError(f"{flag} {model}: its tokenizer does not load ({type(e).__name__}: {why}); save the "
                        "model's tokenizer in the directory (tokenizer.save_pretrained(DIR))") from None
    _check_template(tok, model, tasks, flag)


def _check_template(tok: Any, model: str, tasks: list[str], flag: str) -> None:
    """A chat template, when a selected task renders chats."""
    chat = [t for t in tasks if t in CHAT_TASKS]
    if chat and not getattr(tok, "chat_template", None):
        raise EvalError(f"{flag} {model} has no chat template, which {', '.join(chat)} need: install one with "
                        "minitron.chat_format.install_chat_template(tokenizer) and save the tokenizer, or evaluate "
                        "it with --suite mmlu only")


def check_inputs(cfg: EvalConfig) -> tuple[EndpointBackend | None, EndpointBackend | None]:
    """Refuse bad input before any work (nothing is written): every task's data, each model's tokenizer and chat
    template, the roleplay baseline, and the endpoints (reachable). Returns (endpoint, judge endpoint) backends."""
    tasks = cfg.tasks()
    _check_data(cfg)
    for m in cfg.model:
        _check_tokenizer(m, tasks)
    if "roleplay" in tasks and cfg.roleplay_baseline not in ("first", "reference"):
        cfg.roleplay_baseline = str(resolve_model(cfg.roleplay_baseline, "--roleplay-baseline"))
        _check_tokenizer(cfg.roleplay_baseline, ["roleplay"], "--roleplay-baseline")
    key = cfg.endpoint_api_key or os.environ.get("OPENAI_API_KEY")
    endpoint = judge = None
    if cfg.endpoint:
        endpoint = _connect("--endpoint", cfg.endpoint, cfg.endpoint_model, cfg.tokenizer, key)
        if endpoint.tokenizer is None:
            need = [t for t in tasks if t in ("mmlu", "mmlu_cloze", "ifeval")]
            if need:
                raise EvalError(f"--endpoint {cfg.endpoint}: {', '.join(need)} need the served model's tokenizer, "
                                f"and {endpoint.model!r} is no local directory: pass --tokenizer DIR")
        else:
            _check_template(endpoint.tokenizer, endpoint.model, tasks, "--endpoint model")
    if cfg.judge_endpoint and "roleplay" in tasks:
        judge = _connect("--judge-endpoint", cfg.judge_endpoint, cfg.judge_endpoint_model, None, key)
    return endpoint, judge


def _connect(flag: str, url: str, model: str | None, tokenizer: str | None, key: str | None) -> EndpointBackend:
    """The endpoint's backend; a refusal names the flag it came from."""
    try:
        return EndpointBackend(url, model, tokenizer, api_key=key)
    except EvalError as e:
        raise EvalError(f"{flag}: {e}") from None


def evaluate_model(cfg: EvalConfig, name: str, model: str | EndpointBackend, out: Path, baseline: Any,
                   judge: EndpointBackend | None = None) -> dict[str, Any]:
    """Every task on one model dir or endpoint (finished requests come back from the model's cache)."""
    gen = make_generator(cfg, model, out / "cache")
    local = getattr(gen.backend, "path", None)
    entry = {"name": name, "path": model if isinstance(model, str) else cfg.endpoint,
             "params": stored_parameters(local), "tasks": {}}
    if local is not None:  # which weights these numbers are of: a later model in the same folder does not inherit them
        entry["fingerprint"] = fingerprint.of_path(local)
    for task in cfg.tasks():
        t0 = time.time()
        console.log(f"[bold]{name}[/bold]: {task} ({cfg.data(task)}, limit {cfg.task_limit(task)})")
        res = run_task(task, gen, cfg, out, baseline, judge)
        # per-item records next to the numbers: what each metric was computed from (inspect, re-score, diff)
        with open(_items_path(out, name, task), "w") as fh:
            for it in res.get("items", []):
                fh.write(json.dumps(it, default=str) + "\n")
        entry["tasks"][task] = {"metrics": res["metrics"], "seconds": round(time.time() - t0, 1),
                                "data": cfg.data(task), "limit": cfg.task_limit(task), "note": res.get("note", "")}
        console.log(f"{name} {task}: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in res["metrics"].items())
                    + f" ({entry['tasks'][task]['seconds']} s)")
    console.log(f"{name}: {len(gen.cache)} cached requests ({gen.cache.hits} reused)")
    gen.cache.close()
    return entry


def _items_path(out: Path, name: str, task: str) -> Path:
    """``items/<model>/<task>.jsonl`` (model names like ``width/distilled`` become one folder name)."""
    p = out / "items" / name.replace("/", "__").replace(" ", "_") / f"{task}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def print_table(results: dict[str, Any]) -> None:
    """The headline table on the console."""
    cols = metric_columns(results, headline_only=True)
    table = Table(title=f"eval suite {results['suite']} (%, ± s.e.)")
    for c in ["model", "params"] + [f"{t} {n}" for t, n in cols]:
        table.add_column(c)
    for m in results["models"]:
        cells = []
        for t, n in cols:
            v = m["tasks"].get(t, {}).get("metrics", {}).get(n)
            cells.append(f"{100 * v['value']:.1f}±{100 * v['stderr']:.1f}" if v and v.get("n") else "–")
        table.add_row(m["name"], f"{m['params'] / 1e6:.2f}M" if m.get("params") else "n/a", *cells)
    Console(width=max(Console().width, 160)).print(table)


def run(cfg: EvalConfig) -> Path:
    """Evaluate every model on every task of the suite; write results.json, report.md and plots."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = cfg.names or (default_names(cfg.model) if cfg.model else [cfg.endpoint_model or "endpoint"])
    cfg.model = [str(resolve_model(m)) for m in cfg.model]  # directories, .gguf files and hub names alike
    endpoint, judge = check_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.resolved.json", json.dumps(to_dict(cfg), indent=2))
    models: list[str | EndpointBackend] = list(cfg.model) or [endpoint]
    # roleplay compares every model with one baseline; "first" is the first model (the teacher in stage
    # order), which makes the progression read as "win rate against the teacher"
    baseline_spec = cfg.roleplay_baseline
    if baseline_spec == "first":
        baseline_spec = "reference" if len(models) == 1 else models[0]

    def baseline(gen: Generator) -> Any:  # built on demand; its replies come from its per-model cache
        if baseline_spec == "reference":
            return "reference"
        same = getattr(gen.backend, "path", None) is not None and Path(gen.backend.path).resolve() == Path(baseline_spec).resolve()
        return gen if same else make_generator(cfg, baseline_spec, out / "cache")

    t0 = time.time()
    results: dict[str, Any] = {"suite": cfg.suite, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "config": to_dict(cfg), "headline": HEADLINE, "models": []}
    for name, model in zip(names, models):
        results["models"].append(evaluate_model(cfg, name, model, out, baseline, judge))
        gc.collect()
    results["seconds"] = round(time.time() - t0, 1)
    write_report(results, out, plots=cfg.plots)
    print_table(results)
    console.log(f"eval done in {results['seconds']} s: {out / 'report.md'}")
    return out
