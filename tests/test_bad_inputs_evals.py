"""Bad inputs to ``minitron eval``, ``eval-fc`` and ``serve`` are refused up front: exit 2, one ``error:`` line
naming the cause (file and line for data) and the fix, no traceback, nothing written (``conftest.refused``)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from conftest import make_tiny_model_dir, refused
from test_eval_harness import write_eval_world
from test_eval_ifeval import ROWS as IFEVAL_ROWS

from evals.serve import free_port


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Good data for every task, in the demo world's formats (each case breaks one file of a copy)."""
    return write_eval_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer) -> Path:
    """``good`` (servable on CPU: head_dim 32), ``no-template`` (its chat template deleted), ``bad-tokenizer``
    (tokenizer.json is not JSON), ``not-a-model`` (an empty dir)."""
    root = tmp_path_factory.mktemp("models")
    good = make_tiny_model_dir(root / "good", tiny_tokenizer, head_dim=32)
    shutil.copytree(good, root / "no-template")
    (root / "no-template" / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((root / "no-template" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (root / "no-template" / "tokenizer_config.json").write_text(json.dumps(cfg))
    shutil.copytree(good, root / "bad-tokenizer")
    (root / "bad-tokenizer" / "tokenizer.json").write_text("{not json")
    (root / "not-a-model").mkdir()
    return root


@pytest.fixture(scope="module")
def busy_port():
    """A port something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


class Case:
    """What one parametrized case sees: the good world and models, a scratch dir, the busy port."""

    def __init__(self, world: Path, models: Path, tmp: Path, busy_port: int):
        self.world, self.models, self.tmp, self.busy_port = world, models, tmp, busy_port
        self.out = tmp / "out"

    def eval(self, *extra, model: str = "good", endpoint: str | None = None, world: Path | None = None,
             suite: str = "mmlu,ifeval,rag,bfcl,roleplay") -> list:
        """``minitron eval`` on ``model`` (or ``endpoint``) and every task's data in ``world``."""
        w = world or self.world
        where = ["--endpoint", endpoint] if endpoint else ["--model", self.models / model]
        return ["eval", *where, "--out", self.out, "--suite", suite, "--mmlu-data", w / "mmlu",
                "--ifeval-data", w / "ifeval", "--rag-data", w / "rag", "--bfcl-data", w / "bfcl",
                "--roleplay-data", w / "roleplay.jsonl", *extra]

    def broken(self, rel: str, line: int | None, text: str) -> Path:
        """A copy of the world whose file ``rel`` has ``text`` as line ``line`` (the whole file when None)."""
        w = self.tmp / "world"
        shutil.copytree(self.world, w)
        f = w / rel
        if line is None:
            f.write_text(text)
        else:
            lines = f.read_text().splitlines()
            lines[line - 1] = text
            f.write_text("\n".join(lines) + "\n")
        return w

    def fc(self, predictions: str | None = None, world: Path | None = None) -> list:
        """``minitron eval-fc`` on the world's BFCL files and a predictions file holding ``predictions``."""
        preds = self.tmp / "preds.jsonl"
        preds.write_text(predictions or json.dumps({"id": "simple_python_0", "calls": [{"get_weather": {"city": "Paris"}}]}) + "\n")
        return ["eval-fc", "--questions", (world or self.world) / "bfcl", "--predictions", preds, "--verdicts", self.out]


def _first_row(c: Case, rel: str) -> dict:
    return json.loads((c.world / rel).read_text().splitlines()[0])


# (id, case -> CLI arguments, regex the one error line must match). Every case must leave nothing at c.out.
CASES = [
    ("eval: model dir does not exist", lambda c: c.eval(model="nope"),
     r"--model .*/nope: no such file or directory"),
    ("eval: not a model dir", lambda c: c.eval(model="not-a-model"),
     r"--model .*/not-a-model: not a model directory \(needs config\.json and \*\.safetensors\)"),
    ("eval: no chat template, chat tasks selected", lambda c: c.eval(model="no-template"),
     r"--model .*/no-template has no chat template, which ifeval, rag, bfcl, roleplay need: install one with "
     r"minitron\.chat_format\.install_chat_template.* or evaluate it with --suite mmlu only"),
    ("eval: tokenizer does not load", lambda c: c.eval(model="bad-tokenizer"),
     r"--model .*/bad-tokenizer: its tokenizer does not load \(.*\); save the model's tokenizer"),
    ("eval: malformed JSONL", lambda c: c.eval(world=c.broken("mmlu/mmlu_test.jsonl", 2, '{"question": "q",')),
     r"mmlu/mmlu_test\.jsonl:2: invalid JSON \(.*\); JSONL holds one JSON object per line"),
    ("eval: row that is not an object", lambda c: c.eval(world=c.broken("rag/rag_eval.jsonl", 3, "[1, 2]")),
     r"rag/rag_eval\.jsonl:3: a JSON list, not an object"),
    ("eval: a JSON array where JSONL is expected",
     lambda c: c.eval(world=c.broken("ifeval/input_data.jsonl", None, json.dumps(IFEVAL_ROWS, indent=2))),
     r"ifeval/input_data\.jsonl: a JSON array, but a \.jsonl file holds one JSON object per line; convert it "
     r"with `jq -c '\.\[\]'"),
    ("eval: BFCL question without its functions",
     lambda c: c.eval(world=c.broken("bfcl/BFCL_v4_simple_python.json", 2, json.dumps(
         {k: v for k, v in _first_row(c, "bfcl/BFCL_v4_simple_python.json").items() if k != "function"})), suite="bfcl"),
     r"BFCL_v4_simple_python\.json:2: missing 'function'; expected a row of a BFCL question \(id, question, function\)"),
    ("eval: roleplay row in neither format",
     lambda c: c.eval(world=c.broken("roleplay.jsonl", 1, json.dumps({"prompt": "Be a pirate.", "reply": "Arr."})),
                      suite="roleplay"),
     r"roleplay\.jsonl:1: missing 'instruction', 'output'; expected a row of GPTeacher \(instruction, output\) or "
     r"chat \(messages\), got fields \['prompt', 'reply'\]"),
    ("eval: MMLU row without its answer",
     lambda c: c.eval(world=c.broken("mmlu/mmlu_dev.jsonl", 4, json.dumps(
         {k: v for k, v in _first_row(c, "mmlu/mmlu_dev.jsonl").items() if k != "answer"})), suite="mmlu"),
     r"mmlu/mmlu_dev\.jsonl:4: missing 'answer'; expected a row of MMLU \(question, choices, answer, subject\)"),
    ("eval: data not found", lambda c: c.eval("--rag-data", c.tmp / "absent", suite="rag"),
     r"rag: data not found at .*/absent \(pass --rag-data PATH\)"),
    ("eval: MMLU from the hub while offline", lambda c: c.eval("--mmlu-data", "hub", suite="mmlu"),
     r"--mmlu-data hub needs the Hugging Face hub, and HF_HUB_OFFLINE is set: pass a local data dir"),
    ("eval: unreachable endpoint", lambda c: c.eval(endpoint=f"http://127.0.0.1:{free_port()}/v1"),
     r"--endpoint: no server answers at http://127\.0\.0\.1:\d+ \(\[Errno 111\] Connection refused\): start one with "
     r"`minitron serve --model DIR` or fix the URL"),
    ("eval: unreachable judge endpoint",
     lambda c: c.eval("--judge-endpoint", f"http://127.0.0.1:{free_port()}", suite="roleplay"),
     r"--judge-endpoint: no server answers at http://127\.0\.0\.1:\d+ \(\[Errno 111\] Connection refused\)"),
    ("eval-fc: malformed predictions",
     lambda c: c.fc('{"id": "simple_python_0", "calls": []}\n{"id": \n'),
     r"preds\.jsonl:2: invalid JSON"),
    ("eval-fc: prediction that is not an object",
     lambda c: c.fc('"simple_python_0"\n'),
     r"preds\.jsonl:1: a JSON str, not an object"),
    ("eval-fc: prediction without calls or text",
     lambda c: c.fc('{"id": "simple_python_0", "answer": "x"}\n'),
     r"preds\.jsonl:1: missing 'calls'; expected a row of a prediction \(id, calls\) or a raw-text prediction "
     r"\(id, text\)"),
    ("eval-fc: answer without ground truth",
     lambda c: c.fc(world=c.broken("bfcl/possible_answer/BFCL_v4_simple_python.json", 1, '{"id": "simple_python_0"}')),
     r"possible_answer/BFCL_v4_simple_python\.json:1: missing 'ground_truth'"),
    ("serve: busy port", lambda c: ["serve", "--model", c.models / "good", "--port", c.busy_port],
     r"port \d+ on 127\.0\.0\.1 is not available \(Address already in use\): pick another with --port, or stop "
     r"what listens there"),
    ("serve: model dir does not exist", lambda c: ["serve", "--model", c.models / "nope"],
     r"--model .*/nope: no such file or directory"),
    ("serve: model dir without weights", lambda c: ["serve", "--model", c.models / "not-a-model"],
     r"--model .*/not-a-model: not a model directory"),
    ("serve: model dir without chat template", lambda c: ["serve", "--model", c.models / "no-template"],
     r"no-template has no chat template: install one with minitron\.chat_format\.install_chat_template"),
    ("serve: public host without API key", lambda c: ["serve", "--model", c.models / "good", "--host", "0.0.0.0"],
     r"--host 0\.0\.0\.0 exposes the model beyond this machine: pass --api-key KEY or set MINITRON_API_KEY"),
]


@pytest.mark.parametrize("args, match", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_refused_up_front(args, match, world, models, busy_port, tmp_path, monkeypatch):
    monkeypatch.delenv("MINITRON_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = Case(world, models, tmp_path, busy_port)
    line = refused(args(c), match=match, leaves=(c.out,))
    assert len(line) < 400, line  # one readable line, not a dump


def test_no_template_model_still_runs_mmlu(world, models, tmp_path):
    """The chat-template refusal is about chat tasks only: MMLU alone runs on the same model."""
    from typer.testing import CliRunner

    from minitron.cli import app

    c = Case(world, models, tmp_path, 0)
    res = CliRunner().invoke(app, [str(a) for a in c.eval("--limit", "1", "--no-plots", model="no-template", suite="mmlu")])
    assert res.exit_code == 0, res.output
    assert json.loads((c.out / "results.json").read_text())["models"][0]["tasks"]["mmlu"]["metrics"]["acc"]["n"] == 3
