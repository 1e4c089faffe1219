"""vLLM serving: the real OpenAI-compatible server on a tiny random model (CPU), the client, the chat REPL.

One server is shared by the module (a start costs ~25-90 s and ~3 GB on this machine). Tests marked ``vllm``
skip with the reason when vLLM is not installed (``scripts/install_serve.sh`` installs it); the model-dir
and port checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import socket

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import make_tiny_model_dir
from evals.chat import ChatConfig, ChatSession
from evals.client import ClientError, OpenAIClient, merge_deltas
from evals.serve import ServeError, VLLMServer, check_port, usage_text, validate_model_dir

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (run scripts/install_serve.sh)")

TOOLS = [{"type": "function", "function": {
    "name": "get_color", "description": "The favourite color of a person.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "enum": ["Mirel", "Quen"]}},
                   "required": ["name"]}}}]
# Forces a Hermes tool call out of an untrained model; the server's `hermes` parser must then extract it.
TOOL_CALL_REGEX = r'<tool_call>\{"name": "get_color", "arguments": \{"name": "(Mirel|Quen)"\}\}</tool_call>'
MAX_NEW = 24


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama that vLLM's CPU backend accepts (head_dim 32) with a 1k context for tool prompts, written
    as a GGUF file and imported with ``minitron import``: every server test runs on an imported directory."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, write_tiny_gguf
    from minitron.model_source import import_gguf

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tiny_tokenizer), head_dim=32,
                                                         max_position_embeddings=1024, rope_scaling=None))
    return import_gguf(write_tiny_gguf(root / "tiny-llama.gguf", model, tiny_tokenizer), root / "tiny-llama")


@pytest.fixture(scope="module")
def server(serve_dir):
    """One real vLLM server for the module (stopped, and checked, by the last test)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (run scripts/install_serve.sh)")
    srv = VLLMServer(serve_dir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAIClient(server.url + "/v1", model=server.name)


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

@pytest.mark.vllm
def test_greedy_chat_equals_hf_generate(client, hf):
    """Served greedy chat == HF ``generate`` (same prompt tokens, same new tokens, same text)."""
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "The color of Mirel is"}]
    reply = client.chat(messages, max_tokens=MAX_NEW, temperature=0, return_token_ids=True)
    prompt_ids, new_ids, text = hf_greedy(hf, messages)
    choice = reply["choices"][0]
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)  # same chat template, same single BOS
    assert choice["token_ids"][: len(new_ids)] == new_ids
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (an untrained byte-level
    # model emits byte fragments); HF renders it as U+FFFD. Everything before it must be identical.
    assert choice["message"]["content"] in (text, text.removesuffix("\ufffd"))
    assert len(new_ids) > 0


@pytest.mark.vllm
def test_streaming_equals_plain_reply(client):
    """SSE streaming arrives in several chunks and adds up to the non-streamed reply."""
    messages = [{"role": "user", "content": "Ask Quen about Lima"}]
    plain = client.chat(messages, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    chunks = list(client.chat_stream(messages, max_tokens=16, temperature=0))
    assert sum(bool((c.get("delta") or {}).get("content")) for c in chunks) >= 2  # really incremental
    assert chunks[-1]["finish_reason"] in ("length", "stop")
    assert merge_deltas(chunks)["content"] == plain


@pytest.mark.vllm
def test_tool_call_round_trip(client, hf):
    """A Hermes call forced by structured output is parsed by the server; the result goes back as a tool turn."""
    messages = [{"role": "user", "content": "What is the favourite color of Quen?"}]
    reply = client.chat(messages, TOOLS, "auto", max_tokens=80, temperature=0,
                        structured_outputs={"regex": TOOL_CALL_REGEX})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", reply
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_color"
    args = json.loads(call["function"]["arguments"])
    assert args["name"] in ("Mirel", "Quen")

    streamed = merge_deltas(client.chat_stream(messages, TOOLS, "auto", max_tokens=80, temperature=0,
                                               structured_outputs={"regex": TOOL_CALL_REGEX}))
    assert [c["function"]["name"] for c in streamed["tool_calls"]] == ["get_color"]
    assert json.loads(streamed["tool_calls"][0]["function"]["arguments"]) == args

    history = messages + [{"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": call["id"], "content": '{"color": "red"}'}]
    follow = client.chat(history, TOOLS, max_tokens=MAX_NEW, temperature=0, return_token_ids=True)
    hf_history = messages + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": args}}]},
        {"role": "tool", "content": '{"color": "red"}'}]
    prompt_ids, new_ids, _ = hf_greedy(hf, hf_history, tools=TOOLS)
    assert follow["usage"]["prompt_tokens"] == len(prompt_ids)  # the tool turn was rendered as HF renders it
    assert follow["choices"][0]["token_ids"][: len(new_ids)] == new_ids


@pytest.mark.vllm
def test_completions_prompt_logprobs_match_hf(client, hf):
    """``echo`` + ``logprobs`` give HF's prompt log-probabilities (MC evals through the server)."""
    model, tok = hf
    ids = [tok.bos_token_id] + tok("Zorvath lives in Paris", add_special_tokens=False).input_ids
    out = client.completions(ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    served = out["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert served == pytest.approx(ref, abs=1e-4)


@pytest.mark.vllm
def test_client_reports_server_errors(client):
    """Refused requests and dead endpoints raise ClientError with the reason."""
    with pytest.raises(ClientError, match="HTTP 4"):
        client.chat([{"role": "user", "content": "hi"}], max_tokens=10_000_000)
    with pytest.raises(ClientError, match="cannot reach"):
        OpenAIClient("http://127.0.0.1:9", model="x", timeout=2).chat([{"role": "user", "content": "hi"}])


@pytest.mark.vllm
def test_chat_session_from_stdin(client, server, tmp_path):
    """The terminal chat fed by stdin: system prompt, a plain turn, forced tool calls answered by hand, /save."""
    (tmp_path / "tools.json").write_text(json.dumps([TOOLS[0]["function"]]))  # a bare schema is accepted
    force = json.dumps({"structured_outputs": {"regex": TOOL_CALL_REGEX}})
    results = [f'{{"color": "c{i}"}}' for i in range(3)]
    script = ["/system You are terse.", "Hello Atha", f"/tools {tmp_path / 'tools.json'}", f"/extra {force}",
              "color of Quen?", *results, f"/save {tmp_path / 'chat.json'}", "/quit"]
    out = io.StringIO()
    cfg = ChatConfig(endpoint=server.url + "/v1", temperature=0, max_tokens=64)
    ChatSession(cfg, inp=io.StringIO("\n".join(script) + "\n"), out=out).loop()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user"] + ["assistant", "tool"] * 3
    assert saved["system"] == "You are terse." and saved["tools"][0]["function"]["name"] == "get_color"
    first = client.chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello Atha"}],
                        max_tokens=64, temperature=0)["choices"][0]["message"]["content"]
    assert saved["messages"][1]["content"] == first  # streamed in the REPL == the plain greedy reply
    assert [m["content"] for m in saved["messages"][4::2]] == results  # typed results went back as tool turns
    assert out.getvalue().count("[tool call] get_color(") == 3 and "stopped after 3 tool rounds" in out.getvalue()


@pytest.mark.vllm
def test_server_death_is_reported_with_logs(serve_dir):
    """vLLM failing at startup -> ServeError with vLLM's own last log lines; nothing left running."""
    srv = VLLMServer(serve_dir, extra_args=["--no-such-vllm-flag"])
    with pytest.raises(ServeError, match=r"(?s)vLLM exited with code [1-9].*no-such-vllm-flag"):
        srv.start()
    assert srv.alive() == []


@pytest.mark.vllm
def test_stop_leaves_no_process(server):
    """Last: stop the shared server; every process it had (API server, engine core, workers) is gone."""
    pids = dict(server.pids)
    assert len(pids) >= 2  # the API server and at least its engine process
    server.stop()
    assert server.alive() == []
    leftovers = [p.pid for p in psutil.process_iter(["status"])
                 if p.pid in pids and p.create_time() == pids[p.pid] and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert leftovers == []  # (exited children may stay zombies until init reaps them: not running)
    assert not OpenAIClient(server.url).health()


# --- the `minitron serve` command ----------------------------------------------------------------------

def _minitron(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minitron.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), **kw)


@pytest.mark.vllm
@needs_vllm
def test_cli_busy_port_and_public_host_warning(serve_dir):
    """``minitron serve`` exits 2 on a busy port, after warning about --host 0.0.0.0."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _minitron("serve", "--model", str(serve_dir), "--port", str(port), "--host", "0.0.0.0")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "WARNING: binding to 0.0.0.0" in err and f"port {port} on 0.0.0.0 is not available" in err


def _wait_for_curl(proc: subprocess.Popen, timeout: float = 400) -> str:
    """Read the command's stdout until it prints the ready-to-paste curl (the server is up then)."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.strip().startswith("curl "):
            return "".join(seen)
    raise AssertionError(f"no curl line; stdout: {''.join(seen)[-2000:]}; stderr: {proc.stderr.read()[-3000:]}")


def _server_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_cli_serve_then_ctrl_c(serve_dir):
    """``minitron serve``: URL + curl banner, --api-key enforced, Ctrl-C exits 0 and frees everything."""
    port = __import__("evals.serve", fromlist=["free_port"]).free_port()
    proc = _minitron("serve", "--model", str(serve_dir), "--port", str(port), "--api-key", "k3y")
    banner = _wait_for_curl(proc)
    assert f"http://127.0.0.1:{port}/v1" in banner and "Bearer k3y" in banner
    children = _server_processes(proc)
    reply = OpenAIClient(f"http://127.0.0.1:{port}/v1", api_key="k3y").chat(
        [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply["usage"]["completion_tokens"] == 4
    with pytest.raises(ClientError, match="HTTP 401"):  # the key is enforced
        OpenAIClient(f"http://127.0.0.1:{port}/v1", api_key="wrong", model="x").chat([{"role": "user", "content": "x"}])
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "no server process left" in err
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    check_port("127.0.0.1", port)  # free again


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_cli_exits_nonzero_with_logs_when_vllm_dies(serve_dir):
    """Killing vLLM's engine makes ``minitron serve`` exit non-zero, showing vLLM's last log lines."""
    port = __import__("evals.serve", fromlist=["free_port"]).free_port()
    proc = _minitron("serve", "--model", str(serve_dir), "--port", str(port))
    _wait_for_curl(proc)
    engine = [c for c in _server_processes(proc) if "EngineCore" in " ".join(c.cmdline()) + c.name()]
    assert engine, [c.cmdline() for c in _server_processes(proc)]
    children = _server_processes(proc)
    engine[0].kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "vLLM exited with code" in err and "EngineCore" in err  # vLLM's own last log lines are shown
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


# --- the serving benchmark ----------------------------------------------------------------------------

def test_bench_helpers(tmp_path, tiny_tokenizer):
    """Parameter counting from safetensors headers, the c8 ratio, and the Markdown table."""
    from evals.bench_serve import BenchServeConfig, count_parameters, markdown, ratio

    d = make_tiny_model_dir(tmp_path / "m", tiny_tokenizer, head_dim=32)
    from transformers import AutoModelForCausalLM

    assert count_parameters(d) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())
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


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_bench_serve_runs_end_to_end(serve_dir, tmp_path, capsys):
    """A bounded ``bench serve`` run: one JSON object on stdout, exact token counts, files written."""
    from evals.bench_serve import BenchServeConfig, run

    cfg = BenchServeConfig(teacher=str(serve_dir), width=str(serve_dir), depth=str(tmp_path / "absent"),
                           concurrency=[1, 2], requests=2, max_tokens=8, warmup=1, repeats=1, out=str(tmp_path / "b"))
    result = run(cfg)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["skipped"] == {"depth": str(tmp_path / "absent")}
    assert result["models"]["teacher"]["levels"]["c2"]["output_tokens"] == 4 * 2 * 8  # ignore_eos: exact counts
    assert result["throughput_ratio_width_c8"] is None  # no c8 level here
    assert (tmp_path / "b" / "serve.json").exists() and (tmp_path / "b" / "serve.md").exists()
