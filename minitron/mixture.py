"""``minitron mix``: a distillation corpus that keeps an instruct teacher an instruct model.

Plain text (books, web pages) cut into pieces of about ``piece_chars`` characters, mixed with conversations
from instruction files rendered in the teacher's own chat template, so that logit KD on it teaches the
student the teacher's chat distribution as well as its language model. ``chat_share`` is the share of
characters that come from conversations.

Instruction rows are Alpaca-style ``{"instruction", "input", "output"}`` or ``{"messages": [{"role",
"content"}, ...]}``. Conversations are split into train and held-out by a hash of their text, so a row is on
the same side whatever the mix; the held-out ones also land alone in ``chat_validation.jsonl`` (KL to the
teacher on chat text). Output: ``train.jsonl``, ``validation.jsonl`` (rows ``{"text", "kind"}``) and
``chat_validation.jsonl`` in ``--out``, written atomically.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from minitron.config import ConfigError, arg
from minitron.data import DataError, iter_texts, read_records
from minitron.fingerprint import of_config, record, up_to_date
from minitron.io import atomic_dir, write_json
from minitron.model_source import resolve_model


@dataclass
class MixConfig:
    """Mix plain text with chat conversations rendered in a model's chat template."""

    text: str | None = arg(None, "plain-text source (file, dir with train/validation files, or datasets name)")
    chat: list[str] = arg([], "instruction files (Alpaca rows or messages rows); repeat or comma-separate")
    model: str | None = arg(None, "model whose tokenizer's chat template renders the conversations (the teacher)")
    out: str = arg("runs/mix", "output folder (train.jsonl, validation.jsonl, chat_validation.jsonl)")
    chat_share: float = arg(0.3, "share of characters from conversations, 0..1")
    chars: int = arg(4_000_000, "characters in the train split")
    val_chars: int = arg(400_000, "characters in the validation split")
    chat_val_rows: int = arg(200, "held-out conversations (chat_validation.jsonl)")
    piece_chars: int = arg(2000, "plain text is cut at paragraph ends into pieces of about this many characters")
    seed: int = arg(0, "seed of the interleaving and of the held-out split")
    force: bool = arg(False, "rebuild when the output exists")

    def __post_init__(self) -> None:
        if isinstance(self.chat, str):
            self.chat = [c for c in self.chat.split(",") if c]
        if not 0.0 <= self.chat_share <= 1.0:
            raise ConfigError(f"chat_share must be in [0, 1] (got {self.chat_share})")
        if self.chat_share > 0 and not self.chat:
            raise ConfigError("chat_share > 0 needs --chat FILE (instruction data)")
        if self.chat_share < 1 and not self.text:
            raise ConfigError("chat_share < 1 needs --text SOURCE (plain text)")
        if self.chat and not self.model:
            raise ConfigError("--chat needs --model (its chat template renders the conversations)")
        if min(self.chars, self.piece_chars) < 1 or self.val_chars < 0:
            raise ConfigError("chars and piece_chars must be >= 1, val_chars >= 0")


def pieces(texts: Iterator[str], size: int) -> Iterator[str]:
    """Documents cut at blank lines (else line ends) into pieces of about ``size`` characters."""
    for text in texts:
        buf: list[str] = []
        n = 0
        for para in text.split("\n\n"):
            para = para.strip()
            if not para:
                continue
            buf.append(para)
            n += len(para) + 2
            if n >= size:
                yield "\n\n".join(buf)
                buf, n = [], 0
        if buf:
            yield "\n\n".join(buf)


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A conversation from an Alpaca row (instruction, input, output) or a messages row."""
    if isinstance(row.get("messages"), list):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        prompt = row["instruction"].strip()
        if str(row.get("input") or "").strip():
            prompt += "\n\n" + str(row["input"]).strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"].strip()}]
    raise DataError(f"{where}: an instruction row needs instruction + output, or messages (keys: {sorted(row)})")


def conversations(files: list[str], tokenizer: Any) -> list[str]:
    """Every conversation of ``files`` rendered with the tokenizer's chat template, in file order."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the --model tokenizer has no chat template: conversations cannot be rendered")
    out = []
    for f in files:
        for where, line, row in read_records(f):
            msgs = to_messages(row, f"{where}:{line}")
            if msgs and msgs[-1]["content"]:
                out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    if not out:
        raise DataError(f"no conversations in {files}")
    return out


def held_out(text: str, seed: int, share: float) -> bool:
    """A stable split by content hash: the same conversation is held out whatever the order of the files."""
    h = int(hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()[:8], 16)
    return h < share * 0xFFFFFFFF


def interleave(text_pieces: Iterator[str], chats: list[str], budget: int, chat_share: float,
               rng: random.Random) -> list[dict[str, str]]:
    """Rows until ``budget`` characters, each a chat with the probability that keeps the chat share."""
    rows, n_text, n_chat, chats = [], 0, 0, list(chats)
    rng.shuffle(chats)
    ci = 0
    while n_text + n_chat < budget:
        want_chat = chat_share > 0 and (chat_share >= 1 or n_chat < chat_share * (n_text + n_chat + 1))
        if want_chat and chats:
            c = chats[ci % len(chats)]
            ci += 1
            rows.append({"text": c, "kind": "chat"})
            n_chat += len(c)
        else:
            p = next(text_pieces, None)
            if p is None:
                if not chats or chat_share == 0:
                    break
                chat_share = 1.0  # text ran out: finish with chats
                continue
            rows.append({"text": p, "kind": "text"})
            n_text += len(p)
    return rows


def run(cfg: MixConfig) -> Path:
    """Write the mixed corpus; an existing complete output is kept unless ``--force``."""
    out = Path(cfg.out)
    fp = of_config(cfg)
    if (out / "meta.json").exists() and up_to_date(out, fp, "mix", cfg.force):
        return out
    chats: list[str] = []
    if cfg.chat:
        from transformers import AutoTokenizer

        chats = conversations(cfg.chat, AutoTokenizer.from_pretrained(resolve_model(cfg.model)))
    share_out = cfg.chat_val_rows / max(len(chats), 1)
    val_chats = [c for c in chats if held_out(c, cfg.seed, share_out)]
    train_chats = [c for c in chats if not held_out(c, cfg.seed, share_out)]
    rng = random.Random(cfg.seed)
    splits: dict[str, list[dict[str, str]]] = {}
    for split, budget, pool in (("train", cfg.chars, train_chats), ("validation", cfg.val_chars, val_chats)):
        text = pieces(iter_texts(cfg.text, split), cfg.piece_chars) if cfg.text else iter(())
        splits[split] = interleave(text, pool, budget, cfg.chat_share, rng) if budget else []
    stats = {split: {kind: sum(len(r["text"]) for r in rows if r["kind"] == kind) for kind in ("text", "chat")}
             for split, rows in splits.items()}
    with atomic_dir(out, overwrite=True) as tmp:
        for split, rows in splits.items():
            _write_jsonl(tmp / f"{split}.jsonl", rows)
        _write_jsonl(tmp / "chat_validation.jsonl", [{"text": c, "kind": "chat"} for c in val_chats])
        write_json(tmp / "meta.json", {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                       "chars": stats, "conversations": {"train": len(train_chats),
                                                                         "held_out": len(val_chats)},
                                       "template_model": str(cfg.model) if cfg.model else None})
        record(tmp, fp)
    for split, s in stats.items():
        total = max(sum(s.values()), 1)
        print(f"{split}: {sum(s.values()):,} characters, {s['chat'] / total:.0%} chat")
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
