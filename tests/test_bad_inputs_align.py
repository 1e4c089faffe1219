"""``minitron align`` refuses every bad input before any stage trains: exit 2, one ``error:`` line naming the input
and the fix, no traceback, nothing left in OUT. Each case breaks one thing in an otherwise good four-stage run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import refused
from test_align_resume import write_tiny_data


def _data_flags(data: dict[str, str], but: list[str] = ()) -> list[str]:
    """The data flags of ``data`` except those in ``but`` (list flags repeat to extend: a case's own replaces)."""
    flags = {f"--{k.replace('_', '-')}": v for k, v in data.items()}
    return [a for flag, v in flags.items() if flag not in but for a in (flag, v)]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _rows(path: Path, good: str, bad: str, at: int) -> str:
    """A copy of the JSONL file ``good`` whose line ``at`` (1-based) is replaced by ``bad``."""
    lines = Path(good).read_text().splitlines()
    lines[at - 1] = bad
    return _write(path, "\n".join(lines) + "\n")


def _model_without(tmp: Path, model: Path, *drop: str) -> Path:
    copy = tmp / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns(*drop))
    return copy


def _broken_template(tmp: Path, model: Path) -> Path:
    copy = _model_without(tmp, model)
    # no endfor; it names tools, so the project's template does not replace it (as it replaces a toolless ChatML one)
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{{ tools }}")
    return copy


def _tool_rows(path: Path) -> str:
    """SFT rows that answer with tools at hand: no plain-text question to put a format constraint on."""
    tool = {"type": "function", "function": {"name": "color", "description": "A color.",
                                             "parameters": {"type": "object", "properties": {}}}}
    row = {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}],
           "tools": [tool]}
    return _write(path, "".join(json.dumps(row) + "\n" for _ in range(12)))


# name -> (the case's flags from (tmp, model, good data files), regex of the error line)
CASES = {
    "unknown stage": (lambda t, m, d: ["--stages", "sft,ppo"], r"unknown stage\(s\) \['ppo'\]: .*sft,rm,dpo,rl"),
    "unknown key in a stage section": (
        lambda t, m, d: ["--dpo.betta", "0.2"], r"unknown config key dpo\.betta for DPOArgs; valid keys: .*\bbeta\b"),
    "unknown key in a config file": (
        lambda t, m, d: ["--config", _write(t / "c.yaml", "align:\n  rl:\n    algo: grpo\n    generations: 4\n")],
        r"unknown config key rl\.generations for RLArgs; valid keys: .*num_generations"),
    "verifiable rewards under PPO": (
        lambda t, m, d: ["--rl.algo", "ppo", "--rl.constraint-share", "0.3"],
        r"rl\.constraint_share needs rl\.algo rloo or grpo"),
    "verifiable rewards without plain-text SFT answers": (
        lambda t, m, d: ["--rl.constraint-share", "0.5", "--sft-data", _tool_rows(t / "m.jsonl"),
                         "--sft-eval-data", str(t / "m.jsonl")],
        r"rl\.constraint_share 0\.5: no single-turn SFT examples took constraints \(0 held-in, 0 held-out\)"),
    "value of the wrong type": (lambda t, m, d: ["--sft.steps", "many"], r"sft\.steps: cannot read 'many' as int"),
    "unknown DPO loss": (lambda t, m, d: ["--dpo.loss-type", "sigmoid,dpop"],
                         r"dpo\.loss_type: unknown loss \['dpop'\]; valid: sigmoid, hinge, ipo"),
    "missing data file": (lambda t, m, d: ["--pref-data", str(t / "nope.jsonl")],
                          r"data source not found: \S+nope\.jsonl"),
    "malformed JSONL line": (
        lambda t, m, d: ["--sft-data", _rows(t / "s.jsonl", d["sft_data"], '{"messages": [', 3)],
        r"s\.jsonl:3: invalid JSON"),
    "non-object row": (
        lambda t, m, d: ["--pref-data", _rows(t / "p.jsonl", d["pref_data"], '["a", "b"]', 2)],
        r"p\.jsonl:2: a JSON list, not an object"),
    "JSON array given as JSONL": (
        lambda t, m, d: ["--sft-eval-data", _write(t / "a.jsonl", json.dumps(
            [json.loads(x) for x in Path(d["sft_data"]).read_text().splitlines()], indent=1))],
        r"a\.jsonl: a JSON array, but a \.jsonl file holds one JSON object per line"),
    "SFT row without its fields": (
        lambda t, m, d: ["--sft-data", _rows(t / "s.jsonl", d["sft_data"], '{"text": "hello"}', 4)],
        r"s\.jsonl:4: unknown SFT row schema \(keys \['text'\]\); expected messages, conversations or "
        r"instruction/input/output"),
    "preference row without rejected": (
        lambda t, m, d: ["--pref-data", _rows(t / "p.jsonl", d["pref_data"], '{"prompt": "q", "chosen": "a"}', 5)],
        r"p\.jsonl:5: preference row needs chosen and rejected \(keys \['chosen', 'prompt'\]\)"),
    "unsupported data file type": (lambda t, m, d: ["--sft-data", _write(t / "rows.csv", "a,b\n1,2\n")],
                                   r"rows\.csv: unsupported data file type \(use \.jsonl"),
    "model that does not exist": (lambda t, m, d: ["--model", str(t / "no-model")],
                                  r"--model \S+no-model: no such file or directory"),
    "model without a tokenizer": (
        lambda t, m, d: ["--model", str(_model_without(t, m, "tokenizer*", "chat_template*"))],
        r"--model \S+: no tokenizer files \(tokenizer\.json, .*tokenizer\.save_pretrained"),
    "chat template that does not render": (
        lambda t, m, d: ["--model", str(_broken_template(t, m))],
        r"--model \S+: its chat template cannot render the data \(TemplateSyntaxError: .*delete it"),
    "every layer frozen": (lambda t, m, d: ["--rm.freeze-layers", "4"],
                           r"rm\.freeze_layers=4 leaves nothing to train: \S+ has 4 decoder layers"),
    "RL without a reward model": (lambda t, m, d: ["--stages", "dpo,rl"],
                                  r"the RL stage needs a reward model in \S+rm: run the rm stage first"),
    "fewer RL prompts than one batch": (
        lambda t, m, d: ["--eval-rows", "64"],
        r"rl: 1 training prompts, fewer than one batch .* = 4\), so RL would train no step"),
    "unknown eval task": (lambda t, m, d: ["--eval-suite", "mmlu,mmlu_pro"],
                          r"unknown tasks \['mmlu_pro'\]: --suite is demo, full or a comma list of mmlu"),
    "teacher that does not exist": (
        lambda t, m, d: ["--sft-mix.teacher", str(t / "no-teacher"), "--sft-mix.teacher-share", "0.5"],
        r"--sft-mix\.teacher \S+no-teacher: no such file or directory"),
    "RAG file that does not parse": (
        lambda t, m, d: ["--sft-mix.rag-examples", "2", "--sft-mix.rag-data", _write(t / "rag.jsonl", "{oops\n")],
        r"rag\.jsonl:1: invalid JSON"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_before_any_work(name, tiny_model_dir, tmp_path):
    make, match = CASES[name]
    data, out = write_tiny_data(tmp_path / "data"), tmp_path / "out"
    flags = make(tmp_path, tiny_model_dir, data)
    good = ["align", "--model", tiny_model_dir, "--out", out, "--eval-rows", "4", *_data_flags(data, but=flags)]
    print(refused(good + flags, match=match, leaves=(out,)))


def test_an_out_that_is_a_file_is_refused_and_kept(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("notes")
    print(refused(["align", "--model", tiny_model_dir, "--out", out, *_data_flags(write_tiny_data(tmp_path / "d"))],
                  match=r"--out \S+out: a file, not a folder"))
    assert out.read_text() == "notes"
