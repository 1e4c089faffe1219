"""Bad input to the core stages (run, teacher, import, prune, importance, correct, distill): each is refused before
any work with exit code 2, one ``error:`` line naming the cause, no traceback and nothing left behind.
The align and eval stages have their own tables (test_bad_inputs_align.py, test_bad_inputs_evals.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TEXT, make_tiny_model_dir, refused
from test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """Named bad (and good) inputs: models, corpora and files, built once."""
    from minitron.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("bad")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXT))
    (corpus / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXT[:6]))
    files = {
        "corpus": corpus,
        "model": tiny_model_dir,
        "bad_json_line": _write(root / "bad_line.jsonl", '{"text": "ok"}\n{"text": "unterminated\n'),
        "non_object": _write(root / "non_object.jsonl", '{"text": "ok"}\n["a", "list"]\n'),
        "json_array": _write(root / "array.jsonl", json.dumps([{"text": t} for t in TINY_TEXT])),
        "not_gguf": _write(root / "model.bin", "not a model"),
        "not_a_model": _mkdir(root / "empty_dir"),
        "recipe_bad_yaml": _write(root / "bad.yaml", "out: x\nstudents:\n  width: {hidden_size: 32\n"),
    }
    gpt2 = root / "gpt2"
    shutil.copytree(tiny_model_dir, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    files["gpt2"] = gpt2
    other = train_bpe([t.upper() for t in TINY_TEXT], vocab_size=400)
    files["stranger"] = make_tiny_model_dir(root / "stranger", other, hidden_size=32, num_hidden_layers=2)
    files["root"] = root
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def recipe(root: Path, name: str, **changes) -> Path:
    """The tiny demo recipe with ``changes`` (a section's dict is merged into it), written to a file."""
    raw = {**TINY, "out": str(root / f"{name}-out")}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_args(stage: str, data, out, **extra) -> list:
    model = ["--model", "{model}"] if stage == "correct" else ["--teacher", "{model}", "--student", "{model}"]
    return [stage, *model, "--data", data, "--out", out, "--tokens", "512", "--seq-len", "16",
            *[x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", v)]]


# (id, argv with {names} from `inputs` and {out}, regex the error line must match)
CASES = [
    # minitron run: the whole recipe is checked before the first stage
    ("run-malformed-yaml", ["run", "--config", "{recipe_bad_yaml}"], r"bad\.yaml: malformed YAML at line 4, column 1"),
    ("run-missing-recipe", ["run", "--config", "{root}/nope.yaml"], r"config file not found: .*nope\.yaml"),
    ("run-unknown-key", ["run", "--config", "@recipe:studnets={}"], r"unknown config key studnets .*valid keys: out, data"),
    ("run-distill-typo", ["run", "--config", "@recipe:distill={lrr: 0.1}"],
     r"recipe section 'distill': unknown config key lrr for DistillConfig; valid keys: .*\blr\b"),
    ("run-teacher-gqa", ["run", "--config", "@recipe:teacher={num_attention_heads: 6, num_key_value_heads: 4}"],
     r"recipe section 'teacher': .*not a multiple of num_key_value_heads"),
    ("run-impossible-target", ["run", "--config", "@recipe:students={width: {hidden_size: 4096}}"],
     r"hidden_size=4096 is larger than the source's 48: pruning only removes units"),
    ("run-prune-typo", ["run", "--config", "@recipe:prune={calib_sample: 8}"],
     r"recipe section 'prune': unknown config key calib_sample for PruneConfig; valid keys: model, out, calib"),
    ("run-unknown-stage", ["run", "--config", "@recipe:stages=[world, distil]"], r"unknown stage 'distil'; valid stages"),
    ("run-missing-data", ["run", "--config", "@recipe:data=/nonexistent/corpus"],
     r"data source not found: /nonexistent/corpus"),
    ("run-missing-align-config", ["run", "--config", "@recipe:align_config=/nonexistent/align.yaml"],
     r"align_config file not found: /nonexistent/align\.yaml"),
    ("run-guard-typo", ["run", "--config", "@recipe:align_guard={must_beet: [IFEval]}"],
     r"recipe section 'align_guard': unknown key\(s\) \['must_beet'\]; valid keys: baseline, must_beat, must_hold"),
    ("run-round-teacher", ["run", "--config", "@recipe:rounds=[{teacher_from: wide, students: {s: {hidden_size: 16}}}]"],
     r"teacher_from='wide' is not a student of an earlier round"),
    ("run-missing-teacher-model", ["run", "--config", "@recipe:teacher_model=/nonexistent/teacher"],
     r"teacher_model /nonexistent/teacher: no such file or directory"),
    ("run-unsupported-teacher", ["run", "--config", "@recipe:teacher_model={gpt2}"], r"gpt2.*(not supported|supported)"),
    # one stage at a time
    ("teacher-gqa", ["teacher", "--out", "{out}", "--num-attention-heads", "6", "--num-key-value-heads", "4"],
     r"not a multiple of num_key_value_heads"),
    ("import-not-gguf", ["import", "--gguf", "{not_gguf}", "--out", "{out}"], r"model\.bin.*(GGUF|gguf)"),
    ("import-missing-gguf", ["import", "--gguf", "{root}/none.gguf", "--out", "{out}"], r"none\.gguf"),
    ("prune-missing-model", ["prune", "--model", "{root}/no-model", "--out", "{out}", "--num-hidden-layers", "1"],
     r"--model .*no-model: no such file or directory"),
    ("prune-not-a-model", ["prune", "--model", "{not_a_model}", "--out", "{out}", "--num-hidden-layers", "1"],
     r"not a model directory"),
    ("prune-grows", ["prune", "--model", "{model}", "--calib", "{corpus}", "--out", "{out}", "--hidden-size", "4096"],
     r"hidden_size=4096 is larger than the source's 64"),
    ("prune-gqa", ["prune", "--model", "{model}", "--calib", "{corpus}", "--out", "{out}", "--num-attention-heads", "3"],
     r"GQA"),
    ("prune-unsupported-arch", ["prune", "--model", "{gpt2}", "--calib", "{corpus}", "--out", "{out}",
                                "--num-hidden-layers", "1"], r"gpt2"),
    ("prune-bad-calib-line", ["prune", "--model", "{model}", "--calib", "{bad_json_line}", "--out", "{out}",
                              "--hidden-size", "32"], r"bad_line\.jsonl:2"),
    ("prune-out-is-data", ["prune", "--model", "{model}", "--out", "{corpus}", "--num-hidden-layers", "1"],
     r"exists and is not a model directory \(pass --force"),
    ("importance-missing-calib", ["importance", "--model", "{model}", "--calib", "{root}/nope.jsonl", "--out", "{out}"],
     r"nope\.jsonl"),
    ("correct-json-array", train_args("correct", "{json_array}", "{out}"), r"array\.jsonl: a JSON array, but a \.jsonl file holds one JSON object per line"),
    ("correct-non-object-row", train_args("correct", "{non_object}", "{out}"), r"non_object\.jsonl:2"),
    ("correct-batch", train_args("correct", "{corpus}", "{out}", batch_size="6", micro_batch_size="4"),
     r"--batch-size 6 must be a multiple of --micro-batch-size 4"),
    ("distill-vocab", ["distill", "--teacher", "{model}", "--student", "{stranger}", "--data", "{corpus}",
                       "--out", "{out}"], r"teacher vocab_size \d+ != student vocab_size \d+"),
    ("distill-unknown-flag", train_args("distill", "{corpus}", "{out}", lrr="0.1"), r"unknown config key lrr"),
    ("distill-bad-type", train_args("distill", "{corpus}", "{out}", lr="fast"), r"lr: cannot read 'fast' as float"),
    ("distill-missing-data", train_args("distill", "{root}/none", "{out}"), r"none"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line(case, inputs):
    name, argv, match = case
    root: Path = inputs["root"]
    out = root / f"{name}-out"
    names = {"out": str(out), **{k: str(v) for k, v in inputs.items()}}
    fill = lambda text: re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], m[0]), text)  # noqa: E731
    args = []
    for a in argv:
        if a.startswith("@recipe:"):
            key, _, value = a[len("@recipe:"):].partition("=")
            a = str(recipe(root, name, **{key: yaml.safe_load(fill(value))}))
        args.append(fill(a))
    line = refused(args, match, leaves=(out,))
    print(f"{name}: {line}")


def test_corpus_left_untouched_by_a_refused_prune(inputs):
    """The refused ``--out`` pointing at user data left it as it was."""
    assert sorted(p.name for p in inputs["corpus"].iterdir()) == ["train.jsonl", "validation.jsonl"]
