"""One generation interface for every eval task, in-process or through an OpenAI-compatible server.

``Generator`` is what tasks call:

- ``chat(conversations, tools=None, max_new_tokens=...)``: greedy replies to chat conversations (lists of
  ``{"role", "content"}`` messages, optional JSON-schema tools rendered by the chat template);
- ``complete(prompts, max_new_tokens, stop)``: greedy continuations of raw prompt strings;
- ``loglikelihood(pairs)``: ``(log p(continuation | context), is_greedy)`` for ``(context, continuation)`` pairs,
  tokenised the way lm-eval does it (trailing spaces of the context move to the continuation);
- ``lm_eval_model()``: the same object as an lm-eval ``LM`` (for lm-eval tasks such as MMLU and IFEval).

Prompts are tokenised here, once, with the model's own tokenizer (the chat template starts with BOS, so
rendered chats are encoded without adding special tokens; raw prompts get one BOS). A backend only maps token
ids to text or log-probabilities:

- ``HFBackend``: a model directory loaded with ``AutoModelForCausalLM`` (greedy, batched, stops at the
  ``eos_token_id`` list of ``generation_config.json``);
- ``EndpointBackend``: ``/v1/completions`` with token-id prompts (``echo`` + ``logprobs`` for scoring), or
  ``/v1/chat/completions`` when no local tokenizer is known (through the ``openai`` SDK).

Both see the same token ids, so greedy scores agree in-process and served. Every request goes through the
per-item cache (``evals.cache``): results are committed after each batch and reused on a rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from evals.cache import ItemCache, request_key
from evals.serve import connection_reason, openai_client, server_message, server_root
from minitron.chat_format import stop_token_ids
from minitron.config import MinitronError
from minitron.model_source import resolve_model
from minitron.scoring import continuation_logprobs


class EvalError(MinitronError):
    """An eval that cannot run as configured (missing data, unreachable endpoint...)."""


def _truncate_at_stops(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string (as lm-eval's ``until`` does)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def model_stop_ids(model_dir: str | os.PathLike, tokenizer: Any) -> list[int]:
    """The ``eos_token_id`` list of ``generation_config.json`` (EOS and end of turn without one)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    return [eos] if isinstance(eos, int) else list(eos or stop_token_ids(tokenizer))


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_length: int | None) -> tuple[list[list[int]], int]:
    """Left-truncate prompts and cap new tokens so prompt + reply fits ``max_length`` (same rule for every backend).

    The reply gets at most half the context; every prompt keeps its last ``max_length - reply`` tokens (per
    prompt, so a result never depends on the batch it was computed in).
    """
    if not max_length:
        return prompts, max_new_tokens
    new = min(max_new_tokens, max_length // 2)
    return [p[-(max_length - new):] for p in prompts], new


def score_window(pairs: list[tuple[list[int], list[int]]], max_length: int | None) -> list[list[int]]:
    """context + continuation, left-truncated to ``max_length - 1`` tokens (room for the endpoint's one new token)."""
    return [(c + x)[-(max_length - 1):] if max_length else c + x for c, x in pairs]


def decode_until_stop(tokenizer: Any, ids: list[int], stop_ids: Sequence[int]) -> str:
    """Text of the generated ``ids`` up to the first stop id, special tokens skipped (as vLLM returns it)."""
    cut = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def model_dir_key(path: Path) -> list:
    """A model directory's identity: its resolved path, and the size and modification time of its weights and config."""
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return [str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime] for f in files]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class HFBackend:
    """A Hugging Face model directory in this process (``dtype`` auto: float32 on CPU, bfloat16 on CUDA)."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None, max_length: int = 2048,
                 dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = resolve_model(model_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype not in ("auto", *DTYPES):
            raise EvalError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = dtype
        dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        self.stop_ids = model_stop_ids(self.path, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.name = self.path.name

    def fingerprint(self) -> str:
        """Changes when the weights or config change (file sizes and modification times)."""
        return request_key("hf", model_dir_key(self.path) + ([self.dtype] if self.dtype != "float32" else []))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of a batch of token-id prompts (left-padded), decoded up to the first stop id."""
        prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, self.max_length)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, use_cache=True)
        return [decode_until_stop(self.tokenizer, row, self.stop_ids) for row in out[:, width:].tolist()]

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probs of each continuation and whether it is the greedy one: one right-padded forward per
        batch, by the core's scorer (``minitron.scoring.continuation_logprobs``) on the same window as the endpoint."""
        seqs = score_window(pairs, self.max_length)
        conts = [cont for _, cont in pairs]
        logps, greedy = continuation_logprobs(self.model, [s[: len(s) - len(x)] for s, x in zip(seqs, conts)], conts,
                                              self.pad_id, batch_size=max(len(pairs), 1), greedy=True)
        return list(zip(logps.tolist(), greedy.tolist()))


class EndpointBackend:
    """An OpenAI-compatible server (vLLM's, or any other), through the openai SDK.

    With a local tokenizer (``tokenizer`` argument, or the server's model id when it is a local directory, as
    with ``vllm ... --model DIR``) prompts go as token ids to ``/v1/completions``; without one, chats go to
    ``/v1/chat/completions`` and log-likelihood tasks are unavailable. vLLM's extensions to the requests
    (``return_token_ids``, ``truncate_prompt_tokens``) and to ``/v1/models`` (``max_model_len``) pass through the
    SDK's ``extra_body`` and extra response fields.
    """

    def __init__(self, url: str, model: str | None = None, tokenizer: str | None = None, timeout: float = 600.0,
                 api_key: str | None = None):
        import openai

        self.url, self.client = server_root(url), openai_client(url, api_key, timeout)
        try:  # the raw answer: the SDK parses any 200 leniently (a web page would pass for an empty list)
            raw = self.client.models.with_raw_response.list(timeout=30).http_response
        except openai.AuthenticationError:
            raise EvalError(f"{self.url} refused the API key (HTTP 401): pass --endpoint-api-key KEY or set "
                            "OPENAI_API_KEY") from None
        except openai.APIConnectionError as e:
            raise EvalError(f"no server answers at {self.url} ({connection_reason(e)}): start one with `minitron "
                            "serve --model DIR` or fix the URL") from None
        except openai.APIStatusError as e:
            raw = e.response
        try:
            served = raw.json()["data"]
            ids = [m["id"] for m in served]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{self.url}/v1/models answered HTTP {raw.status_code} without a model list: not an "
                            "OpenAI-compatible server (pass its base URL, e.g. http://HOST:PORT/v1)") from None
        if not ids:
            raise EvalError(f"{self.url} serves no model")
        self.model = model or ids[0]
        # vLLM reports its context length: prompts are fitted to it exactly as in-process
        self.max_length = next((m.get("max_model_len") for m in served if m["id"] == self.model), None)
        # `minitron serve` serves a model under its short name and its directory: the directory has the tokenizer
        local = [i for i in [self.model, *ids] if Path(i, "tokenizer_config.json").exists()]
        tok_dir = tokenizer or (local[0] if local else None)
        self.tokenizer = None
        if tok_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.native_chat = self.tokenizer is None
        self.name = Path(self.model).name or self.model
        self.path = Path(local[0]) if local else None
        self.stop_ids = model_stop_ids(self.path or tok_dir, self.tokenizer) if self.tokenizer is not None else []

    def fingerprint(self) -> str:
        """The served model directory's files when it is local (a restarted server, on any port, reuses the cache),
        else the URL and model id; and the server's context length."""
        where = model_dir_key(self.path) if self.path is not None else [self.url, self.model]
        return request_key("endpoint", where + [self.max_length])

    def _call(self, route: str, create: Any, **body: Any) -> Any:
        """One SDK request; a server that went away or failed is one EvalError saying that a rerun resumes."""
        import openai

        resume = "restart the server and rerun the same command: finished items are read back from the eval's cache"
        try:
            return create(model=self.model, **body)
        except openai.APIConnectionError as e:  # refused, reset, timed out
            raise EvalError(f"the server at {self.url} stopped answering ({connection_reason(e)}); {resume}") from None
        except openai.APIStatusError as e:
            if e.status_code >= 500:
                raise EvalError(f"{self.url}{route} failed with HTTP {e.status_code} ({server_message(e)[:200]}); "
                                f"{resume}") from None
            raise EvalError(f"{self.url}{route} answered HTTP {e.status_code}: {server_message(e)[:500]}") from None

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy completions of token-id prompts; the server stops at the model's eos list.

        The generated token ids are asked for (vLLM's ``return_token_ids``) and decoded here exactly as in-process
        (the server's own text drops a trailing incomplete UTF-8 byte sequence that HF decodes as U+FFFD).
        """
        prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, self.max_length)
        out = self._call("/v1/completions", self.client.completions.create, prompt=prompts, max_tokens=max_new_tokens,
                         temperature=0.0, extra_body={"return_token_ids": True})
        choices = sorted(out.choices, key=lambda c: c.index)
        return [decode_until_stop(self.tokenizer, c.token_ids, self.stop_ids)
                if getattr(c, "token_ids", None) is not None else c.text for c in choices]

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Prompt log-probs through ``echo=true, logprobs=1`` (the last, generated token is ignored)."""
        seqs = score_window(pairs, self.max_length)
        out = self._call("/v1/completions", self.client.completions.create, prompt=seqs, max_tokens=1,
                         temperature=0.0, echo=True, logprobs=1)
        results = []
        for seq, (_, cont), ch in zip(seqs, pairs, sorted(out.choices, key=lambda c: c.index)):
            lps, tops = ch.logprobs.token_logprobs, ch.logprobs.top_logprobs
            span = range(len(seq) - len(cont), len(seq))
            total = sum(lps[i] for i in span)
            greedy = all(max(tops[i].values()) <= lps[i] + 1e-6 for i in span)
            results.append((float(total), greedy))
        return results

    def chat(self, conversation: dict[str, Any], max_new_tokens: int) -> str:
        """One reply through ``/v1/chat/completions``; tool calls come back as ``<tool_call>`` text.

        When the server reports its context (vLLM), the prompt is fitted as token-id prompts are (``fit_prompts``):
        the reply gets at most half the context and the prompt keeps its last tokens (vLLM's left truncation), so
        a long prompt is scored as in-process instead of being refused with HTTP 400.
        """
        import openai

        body: dict[str, Any] = {"messages": conversation["messages"], "max_tokens": max_new_tokens,
                                "temperature": 0.0, "tools": conversation.get("tools") or openai.omit}
        if self.max_length:
            new = fit_prompts([], max_new_tokens, self.max_length)[1]
            body.update(max_tokens=new, extra_body={"truncate_prompt_tokens": self.max_length - new,
                                                    "truncation_side": "left"})
        msg = self._call("/v1/chat/completions", self.client.chat.completions.create, **body).choices[0].message
        calls = "".join(
            f'<tool_call>{{"name": "{c.function.name}", "arguments": {c.function.arguments}}}</tool_call>'
            for c in msg.tool_calls or [])
        return (msg.content or "") + calls


def _order(payload: Any, blob: str) -> tuple:
    """Batch order: longest first; a scoring request ([context, continuation]) by its context, so that the
    choices of one question sit side by side whatever their lengths (they share the context's forward)."""
    if isinstance(payload, list) and len(payload) == 2 and all(isinstance(x, list) for x in payload):
        return (-len(payload[0]), json.dumps(payload[0]), -len(payload[1]), blob)
    return (-_size(payload), blob)


def _size(payload: Any) -> int:
    """Tokens in a request (ids, or [context ids, continuation ids]); characters for anything else."""
    if isinstance(payload, list) and all(isinstance(x, int) for x in payload):
        return len(payload)
    if isinstance(payload, list) and all(isinstance(x, list) for x in payload):
        return sum(len(x) for x in payload)
    return len(json.dumps(payload))


class Generator:
    """The interface every task uses: batched, cached and with progress bars, over one backend."""

    def __init__(self, backend: HFBackend | EndpointBackend, cache: ItemCache | None = None, batch_size: int = 16,
                 score_bos: bool = True):
        # score_bos: put one BOS before scored contexts (the project's models see BOS at every document start;
        # lm-eval's HFLM adds one only when the tokenizer does, which the project tokenizer does not).
        self.backend, self.cache, self.batch_size, self.score_bos = backend, cache, batch_size, score_bos
        self.tokenizer = backend.tokenizer
        self.name = backend.name
        self._fp = backend.fingerprint()

    # ---- tokenisation (shared by both backends) ----
    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise EvalError(f"{what} needs the model's tokenizer: pass --tokenizer DIR with --endpoint")
        return self.tokenizer

    def render_chat(self, conversation: dict[str, Any]) -> str:
        """The chat template applied to ``{"messages": [...], "tools": [...]?}`` with a generation prompt."""
        tok = self._need_tokenizer("chat rendering")
        return tok.apply_chat_template(conversation["messages"], tools=conversation.get("tools") or None,
                                       tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str, bos: bool) -> list[int]:
        tok = self._need_tokenizer("tokenisation")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        has_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
        return ([tok.bos_token_id] if bos and not has_bos and tok.bos_token_id is not None else []) + ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: encode context+continuation together, the continuation is what follows the context."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._encode(context + continuation, bos=self.score_bos)
        ctx = self._encode(context, bos=self.score_bos)
        return ctx, whole[len(ctx):]

    # ---- cached, batched calls ----
    def _cached(self, kind: str, payloads: list[Any], params: dict, compute, desc: str) -> list[Any]:
        """Look every payload up in the cache, compute the misses in batches (committed per batch)."""
        keys = [request_key(kind, [self._fp, p], params) for p in payloads]
        found = self.cache.get_many(keys) if self.cache is not None else {}
        # longest first, and equal lengths in text order: similar lengths batch together, and requests that
        # share a context (multiple-choice options) sit side by side
        blobs = [json.dumps(p) for p in payloads]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(),
                      key=lambda kv: _order(payloads[kv[1]], blobs[kv[1]]))
        # closed on errors too: the bar's line is cleared, so that an error message starts on a line of its own
        with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"{self.name}: {desc}", leave=False,
                  disable=len(todo) == 0) as bar:
            for b in range(0, len(todo), self.batch_size):
                batch = todo[b : b + self.batch_size]
                values = compute([payloads[i] for _, i in batch])
                fresh = {k: v for (k, _), v in zip(batch, values)}
                found.update(fresh)
                if self.cache is not None:
                    self.cache.put_many(fresh)
                bar.update(len(batch))
        return [found[k] for k in keys]

    def complete(self, prompts: list[str], max_new_tokens: int = 256, stop: Sequence[str] = (),
                 desc: str = "generate", bos: bool = True) -> list[str]:
        """Greedy continuations of raw prompt strings, cut at the first ``stop`` string."""
        ids = [self._encode(p, bos=bos) for p in prompts]
        outs = self._cached("gen", ids, {"max_new_tokens": max_new_tokens},
                            lambda batch: self.backend.generate(batch, max_new_tokens), desc)
        return [_truncate_at_stops(o, stop) for o in outs]

    def chat(self, conversations: list[dict[str, Any]], max_new_tokens: int = 256, stop: Sequence[str] = (),
             desc: str = "chat") -> list[str]:
        """Greedy replies to ``{"messages": [...], "tools": [...]?}`` conversations (plain lists also accepted)."""
        convs = [c if isinstance(c, dict) else {"messages": c} for c in conversations]
        if getattr(self.backend, "native_chat", False):
            outs = self._cached("chat", convs, {"max_new_tokens": max_new_tokens},
                                lambda batch: [self.backend.chat(c, max_new_tokens) for c in batch], desc)
            return [_truncate_at_stops(o, stop) for o in outs]
        return self.complete([self.render_chat(c) for c in convs], max_new_tokens, stop, desc, bos=False)

    def loglikelihood(self, pairs: list[tuple[str, str]], desc: str = "score") -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per pair (one BOS in front when ``score_bos``)."""
        enc = [list(self.encode_pair(c, x)) for c, x in pairs]
        outs = self._cached("ll", enc, {}, self.backend.score, desc)
        return [(float(lp), bool(g)) for lp, g in outs]

    def lm_eval_model(self) -> Any:
        """This generator as an lm-eval ``LM`` (see ``LMEvalAdapter``)."""
        return LMEvalAdapter(self)


def _lm_base() -> type:
    from lm_eval.api.model import LM

    return LM


class LMEvalAdapter(_lm_base()):  # type: ignore[misc]
    """lm-eval's model interface over a ``Generator``: lm-eval builds prompts, we run them (cached)."""

    def __init__(self, gen: Generator, max_gen_toks: int | None = None):
        super().__init__()
        self.gen, self.max_gen_toks = gen, max_gen_toks

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.gen.loglikelihood([r.args for r in requests], desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise EvalError("rolling log-likelihood (perplexity tasks) is not supported by the eval harness")

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Group requests by generation settings; each group is one batched, cached call."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            kw = json.loads(key)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until
            n = int(kw.get("max_gen_toks", 256))
            n = min(n, self.max_gen_toks) if self.max_gen_toks else n
            texts = self.gen.complete([requests[i].args[0] for i in idx], n, until, desc="generate_until")
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.gen.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.gen.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.gen.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)


def run_lm_eval(gen: Generator, tasks: list[str], include_path: str | os.PathLike | None, limit: int | None,
                num_fewshot: int | None = None, chat: bool = False, max_gen_toks: int | None = None) -> dict:
    """Run lm-eval ``tasks`` (from ``include_path`` only, or the built-ins when None) on ``gen``.

    Returns lm-eval's per-item samples, ``{task: [sample, ...]}``; scoring is left to the caller.
    """
    import logging

    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # offline means no attempt: unless HF_HUB_OFFLINE is set, every load_dataset (lm-eval's, of our local JSON files
    # too) sends a HEAD to s3.amazonaws.com to count a download; nothing here needs that
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    tm = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_path is None)
    out = lm_eval.simple_evaluate(model=LMEvalAdapter(gen, max_gen_toks), tasks=tasks, num_fewshot=num_fewshot,
                                  limit=limit, task_manager=tm, log_samples=True, bootstrap_iters=0,
                                  apply_chat_template=chat, fewshot_as_multiturn=False, verbosity="WARNING")
    return out["samples"]
