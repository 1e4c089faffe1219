"""Interactive terminal chat with an OpenAI-compatible server (``minitron chat`` / ``make chat``).

    minitron serve --model runs/demo/aligned          # terminal 1
    minitron chat --endpoint http://127.0.0.1:8000/v1 # terminal 2

Replies stream token by token and the whole history is sent each turn. Commands:

    /system TEXT     set the system prompt (kept across /reset)
    /reset           forget the conversation
    /tools FILE.json offer these tools (a JSON list of OpenAI tools or bare function schemas); /tools off
    /extra JSON      extra request fields, vLLM extensions included (e.g. {"top_k": 20}); /extra off
    /attributes A=V  steer a SteerLM model (``minitron align --stages steer_rm,steer_sft``): sets the system prompt's
                     first line to ``Attributes: helpfulness=4 verbosity=0. Give the most helpful answer you
                     can. Answer in one short sentence.`` (integers 0-4, then in words); /attributes off
    /save FILE       write the conversation (system, tools, messages) as JSON
    /help, /quit     (end of input quits too)

When the model calls tools, each call is shown and you type its result, which goes back as a ``tool`` turn;
the model then answers again (at most ``MAX_TOOL_ROUNDS`` calls per message). ``--tool-choice required``
asks for a call on the first reply of each turn; follow-up replies use ``auto``. An untrained model can be
made to call a tool with ``/extra {"structured_outputs": {"regex": "<tool_call>...</tool_call>"}}``.
Input is read line by line from stdin, so a session can be scripted. Requests go through the openai SDK (the
``/extra`` fields as its ``extra_body``); a streamed reply is folded into one message by its
``ChatCompletionStreamState``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

from evals.serve import connection_reason, openai_client, server_message, server_root
from minitron.config import ConfigError, MinitronError, arg
from minitron.io import write_json

HELP = ("commands: /system TEXT, /reset, /tools FILE.json | off, /extra JSON | off, /attributes NAME=V ... | off, "
        "/save FILE, /help, /quit")
MAX_TOOL_ROUNDS = 3  # tool call -> result -> reply cycles per user message


@dataclass
class ChatConfig:
    """``minitron chat``: talk to a served model from the terminal."""

    endpoint: str = arg("http://127.0.0.1:8000/v1", "server URL (with or without /v1)")
    model: str | None = arg(None, "model name on the server (default: the first it serves)")
    api_key: str | None = arg(None, "bearer key, if the server was started with --api-key")
    system: str | None = arg(None, "initial system prompt")
    tools: str | None = arg(None, "JSON file of tools to offer from the start (like /tools FILE)")
    tool_choice: str = arg("auto", "auto | required | none: tool choice for the first reply of each turn")
    max_tokens: int = arg(256, "maximum tokens per reply")
    temperature: float = arg(0.7, "sampling temperature (0 = greedy)")
    stream: bool = arg(True, "stream tokens as they are generated")
    extra: dict = arg({}, "extra JSON fields for every request (vLLM extensions such as top_k, structured_outputs)")

    def __post_init__(self) -> None:
        if self.tool_choice not in ("auto", "required", "none"):
            raise ConfigError(f"--tool-choice {self.tool_choice!r}: use auto, required or none")
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")


def load_tools(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list of tools; bare function schemas (``{"name", "parameters"}``) are wrapped."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tools file not found: {p}")
    try:
        tools = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not JSON: {e}") from None
    tools = tools if isinstance(tools, list) else [tools]
    out = []
    for t in tools:
        if not isinstance(t, dict) or "name" not in t.get("function", t):
            raise ConfigError(f"{p}: each tool needs a name (OpenAI tool or function schema): {t!r:.200}")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out


def set_attributes(system: str | None, text: str) -> str | None:
    """``system`` with its SteerLM attribute line (``minitron.chat_format.attribute_line``) set from ``text``
    (``verbosity=0 helpfulness=4``) as its first line, or removed when ``text`` is empty or ``off``."""
    from minitron.chat_format import ATTRIBUTE_PREFIX, parse_attributes, with_attributes

    rest = "\n".join(ln for ln in (system or "").splitlines() if not ln.strip().startswith(ATTRIBUTE_PREFIX))
    if text in ("", "off"):
        return rest or None
    try:
        values = parse_attributes(text)
    except ValueError as e:
        raise ConfigError(f"/attributes: {e}") from None
    return with_attributes([{"role": "system", "content": rest}], values)[0]["content"]


class ChatError(MinitronError):
    """The server is unreachable or refused a request (the message carries its answer)."""


class ChatSession:
    """The conversation state and the command loop; reads ``inp`` line by line and writes to ``out``."""

    def __init__(self, cfg: ChatConfig, inp: TextIO = sys.stdin, out: TextIO = sys.stdout):
        self.cfg, self.inp, self.out = cfg, inp, out
        self.client, self.url = openai_client(cfg.endpoint, cfg.api_key), server_root(cfg.endpoint)
        self._model = cfg.model
        self.system = cfg.system
        self.tools = load_tools(cfg.tools) if cfg.tools else []
        self.messages: list[dict[str, Any]] = []
        self.extra = dict(cfg.extra)

    @contextlib.contextmanager
    def answering(self, route: str) -> Iterator[None]:
        """SDK errors inside the block become one ChatError line: unreachable, refused (with the server's message),
        or an error event inside a stream."""
        import openai

        try:
            yield
        except openai.APIConnectionError as e:
            raise ChatError(f"cannot reach {self.url}/v1{route}: {connection_reason(e)} (is a server running? "
                            "`minitron serve --model DIR`)") from None
        except openai.APIStatusError as e:
            raise ChatError(f"{self.url}/v1{route} -> HTTP {e.status_code}: {server_message(e)}") from None
        except openai.APIError as e:
            raise ChatError(f"{self.url}/v1{route}: {e.message}") from None

    @property
    def model(self) -> str:
        """The model to ask: the one given, else the server's first."""
        if self._model is None:
            with self.answering("/models"):
                names = [m.id for m in self.client.models.list()]
            if not names:
                raise ChatError(f"{self.url} serves no model")
            self._model = names[0]
        return self._model

    def say(self, text: str = "", end: str = "\n") -> None:
        """Write and flush (streamed tokens must show at once)."""
        self.out.write(text + end)
        self.out.flush()

    def read(self, prompt: str) -> str | None:
        """One line of input (None at end of input)."""
        self.say(prompt, end="")
        line = self.inp.readline()
        return None if line == "" else line.rstrip("\n")

    def conversation(self) -> list[dict[str, Any]]:
        """The messages sent to the server: the system prompt (if any), then the history."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/system":
            self.system = rest or None
            self.say(f"[system prompt {'set' if rest else 'cleared'}]")
        elif name == "/reset":
            self.messages = []
            self.say("[conversation reset]")
        elif name == "/tools":
            self.tools = [] if rest in ("", "off") else load_tools(rest)
            self.say(f"[tools: {', '.join(t['function']['name'] for t in self.tools) or 'none'}]")
        elif name == "/extra":
            try:
                extra = {} if rest in ("", "off") else json.loads(rest)
            except json.JSONDecodeError as e:
                raise ConfigError(f"/extra needs a JSON object: {e}") from None
            if not isinstance(extra, dict):
                raise ConfigError("/extra needs a JSON object, e.g. {\"top_k\": 20}")
            self.extra = extra
            self.say(f"[extra request fields: {json.dumps(extra) if extra else 'none'}]")
        elif name == "/attributes":
            self.system = set_attributes(self.system, rest)
            self.say(f"[system prompt: {self.system or 'none'}]")
        elif name == "/save":
            if not rest:
                raise ConfigError("/save needs a file name")
            write_json(rest, {"endpoint": self.cfg.endpoint, "model": self.model, "system": self.system,
                              "tools": self.tools, "messages": self.messages})
            self.say(f"[saved {len(self.messages)} messages to {rest}]")
        else:
            self.say(HELP)
        return True

    def reply(self, tool_choice: str) -> dict[str, Any]:
        """One assistant message, streamed to the terminal as it arrives."""
        import openai
        from openai.lib.streaming.chat import ChatCompletionStreamState

        tools = self.tools or openai.omit
        extra = {k: v for k, v in self.extra.items() if k not in ("max_tokens", "temperature")}  # the flags win
        request = dict(model=self.model, messages=self.conversation(), max_tokens=self.cfg.max_tokens,
                       temperature=self.cfg.temperature, tools=tools, extra_body=extra or None,
                       tool_choice=tool_choice if self.tools else openai.omit)  # servers reject a choice alone
        self.say("assistant> ", end="")
        with self.answering("/chat/completions"):
            if not self.cfg.stream:
                message = self.client.chat.completions.create(**request).choices[0].message
                self.say(message.content or "", end="")
            else:
                state = ChatCompletionStreamState()  # folds the deltas (text, tool-call fragments) into one message
                for chunk in self.client.chat.completions.create(stream=True, **request):
                    state.handle_chunk(chunk)
                    if chunk.choices:
                        self.say(chunk.choices[0].delta.content or "", end="")
                message = state.current_completion_snapshot.choices[0].message
        self.say()
        keep: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
        if message.tool_calls:
            keep["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                  for c in message.tool_calls]
        return keep

    def turn(self, text: str) -> bool:
        """Send a user message; answer tool calls with typed results until a plain reply. False at end of input.

        A failed request drops the whole turn from the history, so the conversation stays well-formed."""
        start = len(self.messages)
        try:
            return self._turn(text)
        except MinitronError:
            del self.messages[start:]
            raise

    def _turn(self, text: str) -> bool:
        self.messages.append({"role": "user", "content": text})
        choice = self.cfg.tool_choice
        for _ in range(MAX_TOOL_ROUNDS):
            message = self.reply(choice)
            self.messages.append(message)
            if not message.get("tool_calls"):
                return True
            for call in message["tool_calls"]:
                fn = call["function"]
                self.say(f"[tool call] {fn['name']}({fn['arguments']})")
                result = self.read(f"result of {fn['name']}> ")
                if result is None:
                    return False
                self.messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
            choice = "auto"  # a forced call only opens the turn; the model answers the results freely
        self.say(f"[stopped after {MAX_TOOL_ROUNDS} tool rounds]")
        return True

    def loop(self) -> None:
        """Read commands and messages until /quit or end of input (the model name is asked first: a missing
        server fails here, naming the endpoint)."""
        self.say(f"chatting with {self.model} at {self.url} ({HELP})")
        while True:
            line = self.read("you> ")
            if line is None:
                self.say()
                return
            if not line.strip():
                continue
            try:
                going = self.command(line.strip()) if line.startswith("/") else self.turn(line)
            except MinitronError as e:  # a bad /tools file or a refused request: report, keep chatting
                self.say(f"[error] {e}")
                going = True
            if not going:
                return


def run(cfg: ChatConfig) -> None:
    """Chat on stdin/stdout until /quit or end of input."""
    session = ChatSession(cfg)
    try:
        session.loop()
    except KeyboardInterrupt:
        session.say()
