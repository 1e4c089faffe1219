"""vLLM serving: the real OpenAI-compatible server on a tiny model (CPU), the chat REPL, error lines, and
``minitron eval --endpoint`` against in-process evaluation for every task.

One server is shared by the module (a start costs ~25-90 s and ~3 GB on this machine): ``minitron serve`` run
as a user runs it (with an API key), on a tiny Llama written as GGUF and imported, trained for a few seconds to
hold one short conversation with a real tool call. Its first test checks the banner and the key, its last one
stops it with Ctrl-C; it runs under tests/test_offline.py's network guard, and tries no other machine. The first
server test kills a server of its own in the middle of an eval and resumes the eval on the shared one. Tests marked
``vllm`` skip with the reason when vLLM is not installed (``scripts/install_serve.sh`` installs it); the model-dir
and port checks run everywhere. None is marked slow: ``make test`` runs them all.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import socket

import os
import re
import signal
import subprocess
import sys
import time

import openai
import psutil
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState

from conftest import make_tiny_model_dir, refused
from evals.chat import ChatConfig, ChatSession
from evals.serve import ServeError, VLLMServer, check_port, openai_client, usage_text, validate_model_dir

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (run scripts/install_serve.sh)")

TOOLS = [{"type": "function", "function": {
    "name": "get_color", "description": "The favourite color of a person.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "enum": ["Mirel", "Quen"]}},
                   "required": ["name"]}}}]
# Forces a Hermes tool call out of any model; the server's `hermes` parser must then extract it.
TOOL_CALL_REGEX = r'<tool_call>\{"name": "get_color", "arguments": \{"name": "(Mirel|Quen)"\}\}</tool_call>'
MAX_NEW = 24
KEY = "k3y"  # the shared server requires it, as `minitron serve --api-key` does

# The conversation the served model is trained to hold (system prompt, a greeting, then with tools offered a
# question it answers with a real tool call, and after the tool's result a plain answer): `minitron chat` replays it.
SYSTEM = "You are terse."
GREETING = ("Hello Atha", "Hello! I know the colors of people.")
QUESTION, CALL_ARGS = "What is the favourite color of Quen?", '{"name": "Quen"}'
RESULT, ANSWER = '{"color": "red"}', "The favourite color of Quen is red."


def chat_lessons() -> list[tuple[list[dict], list[dict] | None]]:
    """(conversation, tools) whose last assistant turn the served model learns, as `minitron chat` sends them."""
    hello = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": GREETING[0]},
             {"role": "assistant", "content": GREETING[1]}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_color", "arguments": CALL_ARGS}}]}
    ask = hello + [{"role": "user", "content": QUESTION}, call]
    answer = ask + [{"role": "tool", "tool_call_id": "call_0", "content": RESULT},
                    {"role": "assistant", "content": ANSWER}]
    return [(hello, None), (ask, TOOLS), (answer, TOOLS)]


def teach_chat(model, tok, max_steps: int = 400) -> int:
    """Overfit ``model`` on the last assistant turn of each lesson (AdamW, ~100 steps, ~10 s) until every reply
    token is the greedy one; the steps taken."""
    rows = []
    for conv, tools in chat_lessons():
        prompt = tok.apply_chat_template(conv[:-1], tools=tools, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(conv, tools=tools, tokenize=False)
        p, f = (tok(t, add_special_tokens=False).input_ids for t in (prompt, full))
        assert f[: len(p)] == p
        rows.append((f, len(p)))
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (f, n) in enumerate(rows):
        ids[i, : len(f)], mask[i, : len(f)], labels[i, n : len(f)] = torch.tensor(f), 1, torch.tensor(f[n:])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    target = labels[:, 1:] != -100
    # one thread: as fast for a model this small, and ~15x faster than two when another job holds the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(1, max_steps + 1):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            greedy = bool((out.logits[:, :-1].argmax(-1) == labels[:, 1:])[target].all())  # every reply token first
            if greedy and out.loss.item() < 0.02:
                break
            out.loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    assert greedy, f"the chat lessons were not learnt in {max_steps} steps"
    return step


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama that vLLM's CPU backend accepts (head_dim 32) with a 1k context for tool prompts, taught the
    chat lessons, written as a GGUF file and imported with ``minitron import``: every server test runs on an
    imported directory."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, write_tiny_gguf
    from minitron.model_source import import_gguf

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tiny_tokenizer), head_dim=32,
                                                         max_position_embeddings=1024, rope_scaling=None))
    teach_chat(model, tiny_tokenizer)
    gguf = write_tiny_gguf(root / "tiny-llama.gguf", model, tiny_tokenizer, user_defined=True)  # as llama.cpp writes
    return import_gguf(gguf, root / "tiny-llama")


def _minitron(*args: str, **kw) -> subprocess.Popen:
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("env", dict(os.environ, HF_HUB_OFFLINE="1"))
    return subprocess.Popen([sys.executable, "-m", "minitron.cli", *args], stdout=subprocess.PIPE, text=True, **kw)


def _wait_for_curl(proc: subprocess.Popen, timeout: float = 400, log=None) -> str:
    """Read the command's stdout until it prints the ready-to-paste curl (the server is up then)."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.strip().startswith("curl "):
            return "".join(seen)
    err = log.read_text() if log is not None else proc.stderr.read()
    raise AssertionError(f"no curl line; stdout: {''.join(seen)[-2000:]}; stderr: {err[-3000:]}")


def _server_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


class Served:
    """The shared server: ``minitron serve`` running in a subprocess (its stderr, vLLM's log, goes to a file), with
    every process of it under test_offline's network guard and without the HF offline variables."""

    def __init__(self, model_dir, log):
        from evals.serve import free_port
        from test_offline import guarded_env

        self.model_dir, self.name, self.log, self.api_key = model_dir, model_dir.name, log, KEY
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_file = open(log, "w")
        env, self.net_log = guarded_env(log.parent)
        self.proc = _minitron("serve", "--model", str(model_dir), "--port", str(self.port), "--api-key", KEY,
                              stderr=self._log_file, env=env)
        try:
            self.banner = _wait_for_curl(self.proc, log=log)
            while "minitron chat" not in self.banner and self.proc.poll() is None:  # the rest of the banner
                self.banner += self.proc.stdout.readline()
            self.children = _server_processes(self.proc)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Ctrl-C the command if it still runs (it stops vLLM), and wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)
        self._log_file.close()


@pytest.fixture(scope="module")
def server(serve_dir, tmp_path_factory):
    """One real vLLM server for the module, started by ``minitron serve`` (stopped, and checked, by the last test)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (run scripts/install_serve.sh)")
    srv = Served(serve_dir, tmp_path_factory.mktemp("serve-log") / "stderr.txt")
    yield srv
    srv.close()  # (already stopped when the last test ran)


@pytest.fixture(scope="module")
def client(server):
    """The openai SDK's client for the shared server (with its key); requests name the model ``server.name``."""
    return openai_client(server.url + "/v1", KEY)


@pytest.fixture(scope="module")
def hf(serve_dir):
    """The same model directory in HF transformers (the reference for greedy outputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(serve_dir).eval(), AutoTokenizer.from_pretrained(serve_dir)


def hf_greedy(hf, messages, tools=None, max_new_tokens=MAX_NEW):
    """HF ``generate``'s greedy reply: (prompt ids, new ids, text)."""
    model, tok = hf
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stops = set(model.generation_config.eos_token_id)
    if any(t in stops for t in new):
        new = new[: next(i for i, t in enumerate(new) if t in stops)]
    return ids[0].tolist(), new, tok.decode(new, skip_special_tokens=True)


# --- model directory and port checks (no vLLM needed) ---------------------------------------------------

def test_validate_model_dir_errors(tmp_path, tiny_tokenizer):
    """Each broken directory is refused before vLLM starts, with the reason and the fix."""
    good = make_tiny_model_dir(tmp_path / "good", tiny_tokenizer, head_dim=32)
    assert validate_model_dir(good)["model_type"] == "llama"
    with pytest.raises(ServeError, match="not found"):
        validate_model_dir(tmp_path / "nope")

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ServeError, match=r"missing tokenizer\.json, model weights"):
        validate_model_dir(broken)

    no_template = tmp_path / "no-template"
    shutil.copytree(good, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match="no chat template.*install_chat_template"):
        validate_model_dir(no_template)

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(good, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError, match="not supported for serving; supported: LlamaForCausalLM"):
        validate_model_dir(gpt2)


def test_cpu_head_dim_is_checked(tmp_path, tiny_tokenizer):
    d = make_tiny_model_dir(tmp_path / "hd16", tiny_tokenizer)  # conftest default: head_dim 16
    with pytest.raises(ServeError, match="head_dim 16 is not supported by vLLM's CPU attention"):
        validate_model_dir(d, cpu=True)
    assert validate_model_dir(d, cpu=False)["head_dim"] == 16


def test_busy_port_is_refused_before_vllm_starts(tmp_path, tiny_tokenizer):
    """A busy port fails at once with a clear message; the curl banner carries the key."""
    d = make_tiny_model_dir(tmp_path / "m", tiny_tokenizer, head_dim=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is not available.*--port"):
            check_port("127.0.0.1", port)
        srv = VLLMServer(d, port=port)
        with pytest.raises(ServeError, match="not available|not installed"):
            srv.start()
        assert srv.proc is None  # nothing was spawned
    srv.api_key = "s3cret"
    text = usage_text(srv)
    assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in text and "Bearer s3cret" in text


def test_chat_errors_keep_the_session_usable(tmp_path):
    """No server, bad commands: each error is reported, the history stays well-formed, /quit still works."""
    out = io.StringIO()
    script = "hello\n/extra [1]\n/tools /nonexistent.json\n/system Be brief\n/reset\n/help\n/quit\n"
    session = ChatSession(ChatConfig(endpoint="http://127.0.0.1:9/v1", model="m"), inp=io.StringIO(script), out=out)
    session.loop()
    text = out.getvalue()
    assert "[error] cannot reach http://127.0.0.1:9/v1/chat/completions" in text
    assert "/extra needs a JSON object" in text and "tools file not found" in text and "commands: /system" in text
    assert session.messages == [] and session.system == "Be brief"


# --- the real server ---------------------------------------------------------------------------------

def _cache_rows(out) -> dict:
    """Every cached request of an eval folder: {key: value}."""
    import sqlite3

    rows = {}
    for f in (out / "cache").glob("*.sqlite"):
        with sqlite3.connect(f) as db:
            try:
                rows.update(db.execute("SELECT key, value FROM items").fetchall())
            except sqlite3.OperationalError:  # created a moment ago, its table not yet
                pass
    return rows


@pytest.mark.vllm
@needs_vllm
def test_server_death_mid_eval_then_the_rerun_resumes(serve_dir, tmp_path, request):
    """vLLM's engine killed in the middle of ``minitron eval --endpoint``: ``minitron serve`` exits non-zero with
    vLLM's own last log lines and nothing left running; the eval stops with one error line (no traceback, no
    results); its rerun against another server of the same model (the shared one, on another port) reads every
    finished item back from the cache and computes only the rest. First of the server tests, so that the shared
    server starts only after this one's is gone (two never run at once)."""
    from test_eval_mmlu import write_mmlu
    from typer.testing import CliRunner

    from evals.serve import free_port
    from minitron.cli import app

    write_mmlu(tmp_path / "mmlu", n_test=15)  # 3 subjects x 15 questions x 4 choices: 180 scoring requests
    out, port = tmp_path / "eval", free_port()
    eval_args = ["eval", "--suite", "mmlu", "--mmlu-data", str(tmp_path / "mmlu"), "--out", str(out),
                 "--batch-size", "1", "--no-plots"]
    with open(tmp_path / "serve.log", "w") as serve_log, open(tmp_path / "eval.log", "w") as eval_log:
        serve = _minitron("serve", "--model", str(serve_dir), "--port", str(port), stderr=serve_log)
        _wait_for_curl(serve, log=tmp_path / "serve.log")
        children = _server_processes(serve)
        engine = [c for c in children if "EngineCore" in " ".join(c.cmdline()) + c.name()]
        assert engine, [c.cmdline() for c in children]
        ev = _minitron(*eval_args, "--endpoint", f"http://127.0.0.1:{port}/v1", stderr=eval_log)
        deadline = time.monotonic() + 300
        while len(_cache_rows(out)) < 10 and ev.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        engine[0].kill()
        assert serve.wait(timeout=120) == 2
        assert ev.wait(timeout=120) == 2
    err = (tmp_path / "serve.log").read_text()
    assert "vLLM exited with code" in err and "EngineCore" in err  # vLLM's own last log lines are shown
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    text = (tmp_path / "eval.log").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert re.search(rf"http://127\.0\.0\.1:{port}.* rerun the same command: finished items are read back from the "
                     "eval's cache", lines[0]), lines[0]
    assert not (out / "results.json").exists()
    done = _cache_rows(out)
    assert 10 <= len(done) < 180

    server = request.getfixturevalue("server")  # starts now
    res = CliRunner().invoke(app, eval_args + ["--endpoint", f"{server.url}/v1", "--endpoint-api-key", KEY])
    assert res.exit_code == 0, res.output[-3000:]
    assert f"180 cached requests ({len(done)} reused)" in " ".join(res.output.split())
    after = _cache_rows(out)
    assert len(after) == 180 and all(after[k] == v for k, v in done.items())
    assert json.loads((out / "results.json").read_text())["models"][0]["tasks"]["mmlu"]["metrics"]["acc"]["n"] == 45


@pytest.mark.vllm
def test_serve_banner_and_api_key(server, tmp_path):
    """``minitron serve`` prints the URL, a curl and the chat command with the key, and enforces the key (a wrong
    one is refused up front by ``minitron eval --endpoint``, in one line)."""
    assert f"{server.url}/v1" in server.banner and f"Bearer {KEY}" in server.banner
    assert f"minitron chat --endpoint {server.url}/v1 --api-key {KEY}" in server.banner
    assert len(server.children) >= 2  # vLLM's API server and at least its engine process
    served = [m.id for m in openai_client(server.url, KEY).models.list()]
    assert served == [str(server.model_dir.resolve()), server.name]
    with pytest.raises(openai.AuthenticationError):
        openai_client(server.url, "wrong").models.list()
    from test_eval_mmlu import write_mmlu

    write_mmlu(tmp_path / "mmlu", n_test=1)
    refused(["eval", "--endpoint", f"{server.url}/v1", "--endpoint-api-key", "wrong", "--out", tmp_path / "out",
             "--suite", "mmlu", "--mmlu-data", tmp_path / "mmlu"],
            match=r"--endpoint: http://127\.0\.0\.1:\d+ refused the API key \(HTTP 401\): pass --endpoint-api-key",
            leaves=(tmp_path / "out",))


@pytest.mark.vllm
def test_greedy_chat_equals_hf_generate(client, server, hf):
    """Served greedy chat == HF ``generate`` (same prompt tokens, same new tokens, same text)."""
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "The color of Mirel is"}]
    reply = client.chat.completions.create(model=server.name, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                           extra_body={"return_token_ids": True})
    prompt_ids, new_ids, text = hf_greedy(hf, messages)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(prompt_ids)  # same chat template, same single BOS
    assert choice.token_ids[: len(new_ids)] == new_ids
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (an untrained byte-level
    # model emits byte fragments); HF renders it as U+FFFD. Everything before it must be identical.
    assert choice.message.content in (text, text.removesuffix("\ufffd"))
    assert len(new_ids) > 0


@pytest.mark.vllm
class Writes(io.StringIO):
    """A terminal that counts the non-empty writes it gets."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += bool(text)
        return super().write(text)


def test_streaming_equals_plain_reply(server):
    """``minitron chat`` shows a streamed reply piece by piece as it arrives (several writes), and it adds up to
    the non-streamed reply."""
    seen = {}
    for stream in (True, False):
        out = Writes()
        cfg = ChatConfig(endpoint=server.url, api_key=KEY, temperature=0, max_tokens=16, stream=stream)
        session = ChatSession(cfg, inp=io.StringIO("Ask Quen about Lima\n"), out=out)
        session.loop()
        seen[stream] = session.messages[-1]["content"], out.writes
    assert seen[True][0] == seen[False][0] and seen[True][0]
    assert seen[True][1] >= seen[False][1] + 2  # really incremental: three pieces or more instead of one


@pytest.mark.vllm
def test_tool_call_round_trip(client, server, hf):
    """A Hermes call forced by structured output is parsed by the server (streamed too, folded as ``minitron chat``
    folds it); the result goes back as a tool turn."""
    messages = [{"role": "user", "content": "What is the favourite color of Quen?"}]
    request = dict(model=server.name, messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=80,
                   temperature=0, extra_body={"structured_outputs": {"regex": TOOL_CALL_REGEX}})
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", reply
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_color"
    args = json.loads(call.function.arguments)
    assert args["name"] in ("Mirel", "Quen")

    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, **request):
        state.handle_chunk(chunk)
    streamed = state.current_completion_snapshot.choices[0].message
    assert [c.function.name for c in streamed.tool_calls] == ["get_color"]
    assert json.loads(streamed.tool_calls[0].function.arguments) == args

    call = {"id": call.id, "type": "function", "function": {"name": "get_color", "arguments": call.function.arguments}}
    history = messages + [{"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": call["id"], "content": '{"color": "red"}'}]
    follow = client.chat.completions.create(model=server.name, messages=history, tools=TOOLS, max_tokens=MAX_NEW,
                                            temperature=0, extra_body={"return_token_ids": True})
    hf_history = messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": args}}]},
        {"role": "tool", "content": '{"color": "red"}'}]
    prompt_ids, new_ids, _ = hf_greedy(hf, hf_history, tools=TOOLS)
    assert follow.usage.prompt_tokens == len(prompt_ids)  # the tool turn was rendered as HF renders it
    assert follow.choices[0].token_ids[: len(new_ids)] == new_ids


@pytest.mark.vllm
def test_completions_prompt_logprobs_match_hf(client, server, hf):
    """``echo`` + ``logprobs`` give HF's prompt log-probabilities (MC evals through the server)."""
    model, tok = hf
    ids = [tok.bos_token_id] + tok("Zorvath lives in Paris", add_special_tokens=False).input_ids
    out = client.completions.create(model=server.name, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    served = out.choices[0].logprobs.token_logprobs[1 : len(ids)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert served == pytest.approx(ref, abs=1e-4)


@pytest.mark.vllm
def test_refused_requests_are_one_line_with_the_servers_reason(server):
    """A request the server refuses (far too many tokens) is one line carrying the server's own reason, in
    ``minitron chat`` (which goes on) and in the eval backend (which stops)."""
    from evals.generate import EndpointBackend, EvalError

    out = io.StringIO()
    cfg = ChatConfig(endpoint=server.url, api_key=KEY, max_tokens=10_000_000, stream=False)
    ChatSession(cfg, inp=io.StringIO("hi\nhello\n"), out=out).loop()
    errors = [ln for ln in out.getvalue().splitlines() if "[error]" in ln]
    assert len(errors) == 2, out.getvalue()
    assert re.search(r"\[error\] http://127\.0\.0\.1:\d+/v1/chat/completions -> HTTP 400: \w", errors[0]), errors
    backend = EndpointBackend(server.url, api_key=KEY)
    with pytest.raises(EvalError, match=r"^http://127\.0\.0\.1:\d+/v1/completions answered HTTP 400: \w"):
        backend._call("/v1/completions", backend.client.completions.create, prompt=[[1, 2]], max_tokens=10_000_000)


# --- `minitron eval --endpoint` == in-process, every task ------------------------------------------------

@pytest.fixture(scope="module")
def eval_world(tmp_path_factory, tiny_tokenizer):
    """Every task's data in its real format (a few items each), a tiny reward model (the offline roleplay
    judge) and a small punkt_tab for IFEval's checkers."""
    from conftest import tiny_config
    from test_eval_harness import write_eval_world
    from transformers import AutoModelForSequenceClassification

    from evals.ifeval import ensure_punkt

    root = tmp_path_factory.mktemp("eval-world")
    write_eval_world(root)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(tiny_config(vocab_size=len(tiny_tokenizer), num_labels=1))
    rm.save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINITRON_CACHE", str(root / "minitron_cache"))
    ensure_punkt(root / "ifeval" / "input_data.jsonl", max_chars=300_000)  # small (the eval would train on 2M chars)
    yield root
    mp.undo()


@pytest.mark.vllm
def test_generator_endpoint_equals_in_process(server, serve_dir):
    """Greedy chats and log-likelihoods agree in-process and through the server, prompts longer than the
    context included (both fit them to the same window: vLLM reports its max_model_len)."""
    from evals.generate import EndpointBackend, Generator, HFBackend

    from test_eval_generate import CHATS, PAIRS

    local = Generator(HFBackend(serve_dir), None)
    remote = Generator(EndpointBackend(server.url, api_key=KEY), None)
    assert remote.backend.path == serve_dir.resolve() and remote.tokenizer is not None  # served id: the model dir
    assert remote.backend.max_length == local.backend.max_length == 1024
    long_chat = {"messages": [{"role": "user", "content": "Mirel likes red things. " * 250}]}  # > 1024 tokens
    chats = CHATS + [long_chat, {"messages": chat_lessons()[1][0][:-1], "tools": TOOLS}]
    pairs = PAIRS + [("Quen lives in Lima. " * 250, " fox")]
    assert len(local._encode(local.render_chat(long_chat), bos=False)) > 1024
    assert len(local._encode(pairs[-1][0], bos=True)) > 1024
    replies = remote.chat(chats, max_new_tokens=64)
    assert replies == local.chat(chats, max_new_tokens=64)
    assert replies[-1] == f'<tool_call>{{"name": "get_color", "arguments": {CALL_ARGS}}}</tool_call>'
    for (a, ga), (b, gb) in zip(remote.loglikelihood(pairs), local.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


@pytest.mark.vllm
def test_chat_completions_path_equals_in_process(server, serve_dir, eval_world):
    """Without a local tokenizer (a remote server) the endpoint answers chats through ``/v1/chat/completions``:
    the server renders the template, parses tool calls (sent back as ``<tool_call>`` text) and, as in-process,
    fits a prompt longer than its context by keeping its last tokens. The replies of the chat tasks (RAG,
    function calling, roleplay) equal the in-process ones."""
    from evals import bfcl, rag, roleplay
    from evals.generate import EndpointBackend, Generator, HFBackend

    backend = EndpointBackend(server.url, api_key=KEY)
    backend.tokenizer, backend.native_chat = None, True  # as when the served id is no local directory
    remote, local = Generator(backend, None), Generator(HFBackend(serve_dir), None)
    convs = [{"messages": r["messages"], "tools": r["tools"]} for r in bfcl.build_requests(eval_world / "bfcl")]
    convs += [{"messages": it["messages"]} for it in roleplay.load_prompts(eval_world / "roleplay.jsonl", None)]
    convs += [rag.build_prompt("Where does Mirel live?", ["Mirel lives in Paris.", "Quen lives in Lima."])]
    convs += [{"messages": c[:-1], "tools": t} for c, t in chat_lessons()]
    convs += [{"messages": [{"role": "user", "content": "Mirel likes red things. " * n}]} for n in (150, 250)]
    replies = remote.chat(convs, max_new_tokens=64)
    assert replies == local.chat(convs, max_new_tokens=64)
    assert f'<tool_call>{{"name": "get_color", "arguments": {CALL_ARGS}}}</tool_call>' in replies  # a parsed call


def _items(out, name: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "items" / name / f"{task}.jsonl").read_text().splitlines()]


@pytest.mark.vllm
def test_eval_endpoint_equals_in_process_every_task(server, serve_dir, eval_world, tmp_path):
    """``minitron eval --endpoint`` on the served model == ``minitron eval --model`` on its directory (greedy),
    for every task of the harness: the same metrics, item by item."""
    from evals.harness import TASKS, EvalConfig, run

    def evaluate(out, **where):
        return run(EvalConfig(suite=",".join(TASKS), out=str(out), limit=4, mmlu_data=str(eval_world / "mmlu"),
                              ifeval_data=str(eval_world / "ifeval"), rag_data=str(eval_world / "rag"),
                              bfcl_data=str(eval_world / "bfcl"), roleplay_data=str(eval_world / "roleplay.jsonl"),
                              judge_model=str(eval_world / "rm"), ifeval_max_new_tokens=24, rag_max_new_tokens=16,
                              bfcl_max_new_tokens=40, roleplay_max_new_tokens=16, plots=False, **where))

    served = evaluate(tmp_path / "served", endpoint=f"{server.url}/v1", endpoint_api_key=KEY)
    direct = evaluate(tmp_path / "direct", model=[str(serve_dir)])
    a, b = (json.loads((p / "results.json").read_text())["models"][0] for p in (served, direct))
    assert a["name"] == "endpoint" and b["name"] == serve_dir.name and a["params"] == b["params"]
    assert set(a["tasks"]) == set(b["tasks"]) == set(TASKS)
    for task in TASKS:
        assert a["tasks"][task]["note"] == b["tasks"][task]["note"], task
        assert a["tasks"][task]["metrics"] and a["tasks"][task]["metrics"] == b["tasks"][task]["metrics"], task
        ia, ib = _items(served, "endpoint", task), _items(direct, serve_dir.name, task)
        assert len(ia) == len(ib) > 0, task
        for x, y in zip(ia, ib):
            lls = x.pop("loglikelihoods", None), y.pop("loglikelihoods", None)
            assert x == y, task
            if lls[0] is not None:
                assert lls[0] == pytest.approx(lls[1], abs=1e-3), task


@pytest.mark.vllm
def test_endpoint_judge_asks_both_orders(server, serve_dir, eval_world, tmp_path):
    """The served model as the roleplay judge (tiny: no verdict parses, ties) sees each pair in both orders."""
    from evals import roleplay
    from evals.cache import ItemCache
    from evals.generate import EndpointBackend, Generator, HFBackend

    gen = Generator(HFBackend(serve_dir), None)
    judge = Generator(EndpointBackend(server.url, api_key=KEY), ItemCache(tmp_path / "judge.sqlite"))
    res = roleplay.evaluate(gen, eval_world / "roleplay.jsonl", 2, "reference", judge=judge, max_new_tokens=8)
    assert len(judge.cache) == 4  # 2 items x 2 orders
    assert all(len(i["verdicts"]) == 2 for i in res["items"])
    expected = sum(i["score"] for i in res["items"]) / 2
    assert res["metrics"]["win_rate"]["value"] == expected and "position_consistency" in res["metrics"]


# --- `minitron chat` against the server --------------------------------------------------------------------

@pytest.mark.vllm
def test_chat_session_with_a_real_tool_call(client, server, tmp_path):
    """The terminal chat fed by stdin, as `make chat` runs it: a system prompt, a plain turn, then with a /tools
    file a question the model answers with its own tool call (parsed by the server: no forcing), the typed
    result, the model's answer; then forced calls (/extra) stop after MAX_TOOL_ROUNDS; /save."""
    (tmp_path / "tools.json").write_text(json.dumps([TOOLS[0]["function"]]))  # a bare schema is accepted
    force = json.dumps({"structured_outputs": {"regex": TOOL_CALL_REGEX}})
    forced = [f'{{"color": "c{i}"}}' for i in range(3)]
    script = [f"/system {SYSTEM}", GREETING[0], f"/tools {tmp_path / 'tools.json'}", QUESTION, RESULT,
              f"/save {tmp_path / 'chat.json'}", f"/extra {force}", "color of Mirel?", *forced, "/quit"]
    out = io.StringIO()
    cfg = ChatConfig(endpoint=server.url + "/v1", api_key=KEY, temperature=0, max_tokens=64)
    ChatSession(cfg, inp=io.StringIO("\n".join(script) + "\n"), out=out).loop()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["system"] == SYSTEM and saved["tools"][0]["function"]["name"] == "get_color"
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert saved["messages"][1]["content"] == GREETING[1]
    first = client.chat.completions.create(
        model=server.name, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": GREETING[0]}],
        max_tokens=64, temperature=0).choices[0].message.content
    assert first == GREETING[1]  # streamed in the REPL == the plain greedy reply
    (call,) = saved["messages"][3]["tool_calls"]
    assert call["function"]["name"] == "get_color" and json.loads(call["function"]["arguments"]) == {"name": "Quen"}
    assert call["id"] and saved["messages"][4] == {"role": "tool", "tool_call_id": call["id"], "content": RESULT}
    assert saved["messages"][5]["content"] == ANSWER  # the model read the tool's result back
    text = out.getvalue()
    assert f"[tool call] get_color({CALL_ARGS})" in text and f"assistant> {ANSWER}" in text
    assert text.count("[tool call] get_color(") == 4 and "stopped after 3 tool rounds" in text


@pytest.mark.vllm
def test_server_death_is_reported_with_logs(serve_dir):
    """vLLM failing at startup -> ServeError with vLLM's own last log lines; nothing left running."""
    srv = VLLMServer(serve_dir, extra_args=["--no-such-vllm-flag"])
    with pytest.raises(ServeError, match=r"(?s)vLLM exited with code [1-9].*no-such-vllm-flag"):
        srv.start()
    assert srv.alive() == []


@pytest.mark.vllm
def test_the_server_tried_no_network(server):
    """Over its whole life so far (usage statistics are sent shortly after start-up), no process of the shared
    server tried to reach another machine, though no HF offline variable was set."""
    from test_offline import attempts

    assert attempts(server.net_log) == []


@pytest.mark.vllm
def test_ctrl_c_stops_every_process(server):
    """Last: Ctrl-C on the shared ``minitron serve`` exits 0 and every process it had (API server, engine
    core, workers) is gone; the port is free again."""
    server.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-3000:]
    assert "no server process left" in server.log.read_text()
    leftovers = [c.pid for c in server.children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []  # (exited children may stay zombies until init reaps them: not running)
    with pytest.raises(openai.APIConnectionError):
        openai_client(server.url, KEY, timeout=5).models.list()
    check_port("127.0.0.1", server.port)  # free again


# --- the `minitron serve` command on its own ---------------------------------------------------------------

@pytest.mark.vllm
@needs_vllm
def test_cli_busy_port_and_public_host_warning(serve_dir):
    """``minitron serve`` refuses --host 0.0.0.0 without a key; with one, it exits 2 on a busy port after the notice."""
    refused = _minitron("serve", "--model", str(serve_dir), "--host", "0.0.0.0")
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "--api-key KEY or set MINITRON_API_KEY" in " ".join(err.split())
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _minitron("serve", "--model", str(serve_dir), "--port", str(port), "--host", "0.0.0.0",
                         "--api-key", "k3y")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "serving on 0.0.0.0" in err and f"port {port} on 0.0.0.0 is not available" in err


# --- the serving benchmark ----------------------------------------------------------------------------

def test_bench_helpers(tmp_path, tiny_tokenizer):
    """Parameter counting from safetensors headers, the c8 ratio, and the Markdown table."""
    from transformers import AutoModelForCausalLM

    from evals.bench_serve import BenchServeConfig, markdown, ratio
    from minitron.weights import stored_parameters

    d = make_tiny_model_dir(tmp_path / "m", tiny_tokenizer, head_dim=32)
    assert stored_parameters(d) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())
    level = {"requests_per_s": 1.0, "mean_latency_s": 0.1}
    results = {"teacher": {"levels": {"c8": {**level, "output_tokens_per_s": 100.0}}},
               "width": {"levels": {"c8": {**level, "output_tokens_per_s": 180.0}}}}
    assert ratio(results, "width", "c8") == 1.8 and ratio(results, "depth", "c8") is None
    with pytest.raises(Exception, match="teacher directory not found"):
        BenchServeConfig(teacher=str(tmp_path / "none"))
    results["teacher"].update(parameters=10, dir="t")
    results["width"].update(parameters=5, dir="w")
    table = markdown({"device": "cpu", "max_tokens": 8, "repeats": 1, "models": results,
                      "throughput_ratio_width_c8": 1.8, "throughput_ratio_depth_c8": None})
    assert "| width | 5 | 8 | " in table and "throughput_ratio_width_c8 = 1.8" in table


@pytest.mark.vllm
@needs_vllm
def test_bench_serve_runs_end_to_end(serve_dir, tmp_path, capsys):
    """A bounded ``bench serve`` run (one model: one more server start): one JSON object on stdout, exact token
    counts, files written, absent students skipped."""
    from evals.bench_serve import BenchServeConfig, run

    cfg = BenchServeConfig(teacher=str(serve_dir), width=str(tmp_path / "absent"), depth=str(tmp_path / "absent"),
                           concurrency=[1, 2], requests=2, max_tokens=8, warmup=1, repeats=1, out=str(tmp_path / "b"))
    result = run(cfg)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["skipped"] == {"width": str(tmp_path / "absent"), "depth": str(tmp_path / "absent")}
    assert result["models"]["teacher"]["levels"]["c2"]["output_tokens"] == 4 * 2 * 8  # ignore_eos: exact counts
    assert result["throughput_ratio_width_c8"] is None  # no width model, no c8 level here
    assert (tmp_path / "b" / "serve.json").exists() and (tmp_path / "b" / "serve.md").exists()



def test_serving_beyond_loopback_needs_an_api_key(monkeypatch):
    from evals.serve import ServeConfig
    from minitron.config import ConfigError

    monkeypatch.delenv("MINITRON_API_KEY", raising=False)
    assert ServeConfig(model="m").host == "127.0.0.1"  # the default binds loopback, no key needed
    with pytest.raises(ConfigError, match="--api-key KEY or set MINITRON_API_KEY"):
        ServeConfig(model="m", host="0.0.0.0")
    assert ServeConfig(model="m", host="0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv("MINITRON_API_KEY", "from-env")
    assert ServeConfig(model="m", host="0.0.0.0").api_key == "from-env"  # then passed to vLLM's --api-key


def test_a_server_dies_with_the_process_that_started_it(tmp_path):
    """The server's process is started with die_with_parent: SIGKILL its starter and it stops (no orphan keeps the
    port and the memory). Shown on a stand-in child (sleep), started exactly as VLLMServer starts vLLM."""
    from pathlib import Path

    starter = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from evals.serve import die_with_parent\n"
        "p = subprocess.Popen(['sleep', '120'], start_new_session=True, preexec_fn=die_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    child = int(starter.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    gone = not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
    assert gone, "the child outlived its starter"
