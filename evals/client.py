"""A tiny client for OpenAI-compatible servers (vLLM's, or any other), over plain ``requests``.

    client = OpenAIClient("http://127.0.0.1:8000/v1")           # or the base URL without /v1
    reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=32, temperature=0)
    message = reply["choices"][0]["message"]                    # {"role", "content", "tool_calls"?}
    for delta in client.chat_stream(messages): ...               # streamed {"content"?, "tool_calls"?} deltas
    client.completions("The sky is", max_tokens=0, echo=True, logprobs=1)  # prompt log-probabilities

Responses are returned as the server's JSON (dicts); extra keyword arguments go into the request body as they
are (vLLM extensions such as ``structured_outputs``, ``ignore_eos``, ``return_token_ids``). HTTP and
connection errors raise ``ClientError`` with the server's own message.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import requests

from minitron.config import MinitronError


class ClientError(MinitronError):
    """The server is unreachable or refused the request (the message carries its answer)."""


class OpenAIClient:
    """Chat completions (plain, streamed, with tools) and completions (with echo/logprobs) for one endpoint."""

    def __init__(self, endpoint: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        base = endpoint.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api_key, self.timeout, self._model = api_key, timeout, model
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def health(self) -> bool:
        """True when ``/health`` answers 200 (vLLM); False when the server is down."""
        try:
            return self.session.get(f"{self.base}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def models(self) -> list[str]:
        """Model names the server serves (``/v1/models``)."""
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    @property
    def model(self) -> str:
        """The model to ask: the one given, else the server's first."""
        if self._model is None:
            names = self.models()
            if not names:
                raise ClientError(f"{self.base} serves no model")
            self._model = names[0]
        return self._model

    def _request(self, method: str, route: str, body: dict | None = None, stream: bool = False) -> requests.Response:
        """One HTTP call; unreachable servers and non-200 answers become ClientError with the server's message."""
        url = f"{self.base}{route}"
        try:
            resp = self.session.request(method, url, json=body, timeout=self.timeout, stream=stream)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach {url}: {e} (is a server running? `minitron serve --model DIR`)") from None
        if resp.status_code != 200:
            try:
                detail = resp.json().get("error", resp.json())
                detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            except ValueError:
                detail = resp.text[:500]
            raise ClientError(f"{method} {url} -> HTTP {resp.status_code}: {detail}")
        return resp

    def _chat_body(self, messages: list[dict], tools: list[dict] | None, tool_choice: Any, **kw: Any) -> dict:
        """The chat request body; ``tool_choice`` is only sent with tools (servers reject it alone)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, **kw}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        return body

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
             **kw: Any) -> dict[str, Any]:
        """``/v1/chat/completions`` (``max_tokens``, ``temperature``... go through ``kw``); the JSON response."""
        return self._request("POST", "/v1/chat/completions", self._chat_body(messages, tools, tool_choice, **kw)).json()

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
                    **kw: Any) -> Iterator[dict[str, Any]]:
        """Streamed chat: yields each chunk's ``choices[0]`` (``{"delta": {...}, "finish_reason"}``)."""
        body = self._chat_body(messages, tools, tool_choice, stream=True, **kw)
        with self._request("POST", "/v1/chat/completions", body, stream=True) as resp:
            for chunk in iter_sse(resp):
                if chunk.get("choices"):
                    yield chunk["choices"][0]

    def completions(self, prompt: str | list[int] | list, **kw: Any) -> dict[str, Any]:
        """``/v1/completions`` for a text or token-id prompt (``echo=True, logprobs=1`` scores the prompt)."""
        body = {"model": self.model, "prompt": prompt, **kw}
        return self._request("POST", "/v1/completions", body).json()


def iter_sse(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """Parse a server-sent event stream of JSON ``data:`` lines, up to ``data: [DONE]``."""
    for raw in resp.iter_lines(decode_unicode=False):
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise ClientError(f"stream error: {obj['error']}")
        yield obj


def merge_deltas(deltas: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> dict[str, Any]:
    """Fold streamed choices into one assistant message ``{"role", "content", "tool_calls"?}``.

    Tool-call fragments are joined by their ``index`` (name once, arguments as concatenated JSON text).
    """
    content, calls = [], {}
    for choice in deltas:
        delta = choice.get("delta") or {}
        content.append(delta.get("content") or "")
        for tc in delta.get("tool_calls") or []:
            call = calls.setdefault(tc.get("index", len(calls)), {"id": None, "type": "function",
                                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = tc.get("id") or call["id"]
            fn = tc.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
