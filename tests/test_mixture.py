"""The distillation mix: plain text plus conversations in the teacher's chat template, held-out chats kept out."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TEXT, make_tiny_model_dir
from minitron.config import ConfigError
from minitron.data import DataError
from minitron.mixture import MixConfig, pieces, run


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("mix")
    text = root / "text"
    text.mkdir()
    book = "\n\n".join(TINY_TEXT)
    for split in ("train", "validation"):
        (text / f"books_{split}.jsonl").write_text(json.dumps({"text": book * 3}) + "\n")
    chat = root / "instructions.jsonl"
    rows = [{"instruction": f"Tell me about {t[:30]} number {i}", "input": "" if i % 2 else "context here",
             "output": f"Answer {i}: {t}"} for i, t in enumerate(TINY_TEXT)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]})
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_tiny_model_dir(root / "model", tiny_tokenizer)
    return text, chat, model


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mix_keeps_the_chat_share_and_renders_chats_with_the_template(sources, tmp_path, tiny_tokenizer):
    text, chat, model = sources
    out = run(MixConfig(text=str(text), chat=[str(chat)], model=str(model), out=str(tmp_path / "mix"),
                        chat_share=0.3, chars=20_000, val_chars=4_000, chat_val_rows=8, piece_chars=300))
    train, held = read(out / "train.jsonl"), read(out / "chat_validation.jsonl")
    chars = {k: sum(len(r["text"]) for r in train if r["kind"] == k) for k in ("text", "chat")}
    assert abs(chars["chat"] / sum(chars.values()) - 0.3) < 0.05, chars
    assert sum(chars.values()) >= 20_000
    chats = [r["text"] for r in train if r["kind"] == "chat"]
    from minitron.mixture import to_messages

    rendered = {tiny_tokenizer.apply_chat_template(to_messages(r, "x"), tokenize=False) for r in read(chat)}
    assert chats and set(chats) <= rendered  # every chat row is a source conversation in the model's template
    assert 0 < len(held) and not set(h["text"] for h in held) & set(chats)  # held-out chats never trained on
    meta = json.loads((out / "meta.json").read_text())
    assert meta["conversations"]["held_out"] == len(held)
    assert all(len(r["text"]) <= 2 * 300 + 200 for r in train if r["kind"] == "text")


def test_the_held_out_split_does_not_depend_on_the_budget(sources, tmp_path):
    text, chat, model = sources
    a = run(MixConfig(text=str(text), chat=[str(chat)], model=str(model), out=str(tmp_path / "a"), chars=5_000,
                      val_chars=1_000, chat_val_rows=8))
    b = run(MixConfig(text=str(text), chat=[str(chat)], model=str(model), out=str(tmp_path / "b"), chars=15_000,
                      val_chars=1_000, chat_val_rows=8))
    assert read(a / "chat_validation.jsonl") == read(b / "chat_validation.jsonl")


def test_bad_rows_and_configs_are_named(sources, tmp_path):
    text, _, model = sources
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: an instruction row needs instruction \+ output"):
        run(MixConfig(text=str(text), chat=[str(bad)], model=str(model), out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="chat_share must be in"):
        MixConfig(text=str(text), chat=[str(bad)], model=str(model), chat_share=1.5)
    with pytest.raises(ConfigError, match="needs --model"):
        MixConfig(text=str(text), chat=[str(bad)])
    with pytest.raises(ConfigError, match="needs --chat"):
        MixConfig(text=str(text), chat_share=0.2)


def test_pieces_cut_at_paragraphs():
    doc = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(20))
    out = list(pieces(iter([doc]), 200))
    assert all(p.startswith("paragraph") for p in out) and len(out) >= 5
    assert "".join(out).replace("\n\n", "") == doc.replace("\n\n", "")
