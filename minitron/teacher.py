"""Train the embedded default teacher: a byte-level BPE tokenizer and a small Llama, from scratch.

On the demo world (``--data world``, the default) it learns the world's facts in a few minutes on 2 CPU cores;
given a corpus (``--data ../shared/data/lm/gutenberg``, a file or a ``datasets`` name) the same code trains
on real text. The output is a standard Hugging Face directory: config, safetensors, tokenizer with the chat
template, generation config, model card, ``metrics.json`` (loss, time, world multiple-choice accuracy).

    minitron teacher --config configs/demo.yaml --out runs/demo/teacher
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minitron.config import ConfigError, arg, save_resolved
from minitron.data import iter_texts, packed_sequences, read_jsonl
from minitron.io import count_parameters, is_model_dir, save_model_dir, write_json

WORLD = "world"


@dataclass
class TeacherConfig:
    out: str = arg("runs/demo/teacher", "output model directory")
    data: str = arg(WORLD, "training corpus: 'world' (the demo world), a file/dir path, or a datasets name")
    world_dir: str = arg("runs/demo/world", "where the demo world lives (generated if missing)")
    text_field: str = arg("text", "JSON field holding the document text")
    vocab_size: int = arg(1024, "BPE vocabulary size (specials included)")
    tokenizer_chars: int = arg(2_000_000, "characters of the corpus used to train the tokenizer")
    hidden_size: int = arg(192, "model width")
    intermediate_size: int = arg(384, "MLP width")
    num_hidden_layers: int = arg(6, "decoder layers")
    num_attention_heads: int = arg(6, "query heads")
    num_key_value_heads: int = arg(2, "KV heads (GQA: must divide num_attention_heads)")
    head_dim: int = arg(32, "per-head width (written explicitly into the config)")
    tie_word_embeddings: bool = arg(False, "tie input and output embeddings")
    seq_len: int = arg(256, "training sequence length")
    batch_size: int = arg(16, "sequences per step")
    tokens: int = arg(1_600_000, "training tokens (sets the number of steps)")
    max_steps: int | None = arg(None, "cap on steps (smoke runs)")
    time_budget_s: float | None = arg(None, "stop early after this many seconds")
    lr: float = arg(2e-3, "peak learning rate (cosine to 10% after warmup)")
    warmup_steps: int = arg(30, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    seed: int = arg(0, "random seed")
    eval_items: int = arg(200, "world multiple-choice items scored after training (0 = skip)")
    force: bool = arg(False, "retrain even if the output exists")

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads} (GQA groups must be equal)")
        if self.seq_len < 8 or self.batch_size < 1 or self.tokens < self.seq_len:
            raise ConfigError("seq_len >= 8, batch_size >= 1 and tokens >= seq_len are required")


def corpus_source(cfg: TeacherConfig) -> str:
    """The corpus path: the demo world's corpus (generating the world if needed) or ``cfg.data``."""
    if cfg.data != WORLD:
        return cfg.data
    from minitron.world import WorldConfig, ensure_world

    return str(ensure_world(WorldConfig(out=cfg.world_dir)) / "corpus")


def build_tokenizer(source: str, cfg: TeacherConfig) -> Any:
    """Train the BPE on the first ``tokenizer_chars`` characters of the corpus."""
    from minitron.tokenizer import train_bpe

    def sample():
        total = 0
        for text in iter_texts(source, "train", cfg.text_field):
            for i in range(0, len(text), 10_000):  # bounded pieces keep the trainer's memory flat
                yield text[i : i + 10_000]
            total += len(text)
            if total >= cfg.tokenizer_chars:
                return

    return train_bpe(sample(), vocab_size=cfg.vocab_size)


def build_model(cfg: TeacherConfig, tokenizer: Any) -> torch.nn.Module:
    """A random Llama of the configured shape (GQA, explicit head_dim) for ``tokenizer``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from minitron.chat_format import stop_token_ids

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, max_position_embeddings=max(512, cfg.seq_len),
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(tokenizer),
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def lr_at(step: int, total: int, cfg: TeacherConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model: torch.nn.Module, rows: torch.Tensor, cfg: TeacherConfig) -> list[dict[str, float]]:
    """Plain next-token training over shuffled packed rows; returns the logged history."""
    total = cfg.tokens // (cfg.batch_size * cfg.seq_len)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    order = itertools.chain.from_iterable(torch.randperm(len(rows), generator=g).tolist() for _ in itertools.count())
    history, start = [], time.time()
    model.train()
    bar = tqdm(range(total), desc="teacher", unit="step")
    for step in bar:
        batch = rows[[next(order) for _ in range(cfg.batch_size)]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - start
        tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / elapsed
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
        if step % 10 == 0 or step == total - 1:
            history.append({"step": step, "loss": loss.item(), "lr": lr_at(step, total, cfg), "tokens_per_s": tok_s})
        if cfg.time_budget_s is not None and elapsed > cfg.time_budget_s:
            break
    model.eval()
    return history


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over packed rows."""
    losses = [model(input_ids=rows[i : i + batch_size], labels=rows[i : i + batch_size]).loss.item()
              for i in range(0, len(rows), batch_size)]
    return sum(losses) / len(losses)


@torch.no_grad()
def fact_accuracy(model: torch.nn.Module, tokenizer: Any, mc_file: str | Path, limit: int = 200) -> dict[str, float]:
    """Cloze multiple choice on world facts: the choice with the highest log-likelihood after the fact's stem.

    "The favorite color of X is" + " red" (the separating space goes on the choice, see NOTES.md).
    Chance is 25% (four choices).
    """
    from minitron.world import ATTRIBUTES

    items = list(itertools.islice(read_jsonl(mc_file), limit))
    correct = 0
    for item in items:
        attr = item["subject"].removeprefix("world_")
        name = _entity_from_question(item["question"], ATTRIBUTES[attr]["question"])
        stem = ATTRIBUTES[attr]["answer"].split("{v}")[0].format(n=name).rstrip()
        scores = [_continuation_logprob(model, tokenizer, stem, " " + c) for c in item["choices"]]
        correct += int(max(range(4), key=scores.__getitem__) == item["answer"])
    n = len(items)
    acc = correct / max(1, n)
    return {"world_mc_accuracy": acc, "world_mc_stderr": math.sqrt(acc * (1 - acc) / max(1, n)), "world_mc_n": n,
            "chance": 0.25}


def _entity_from_question(question: str, template: str) -> str:
    before, after = template.split("{n}")
    return question[len(before) : len(question) - len(after)]


def _continuation_logprob(model: torch.nn.Module, tokenizer: Any, context: str, continuation: str) -> float:
    ctx = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logp[len(ctx) - 1 :].gather(-1, targets[len(ctx) - 1 :, None]).sum().item()


def run(cfg: TeacherConfig) -> Path:
    """Train tokenizer + teacher and save them as a standard HF model directory."""
    out = Path(cfg.out)
    if is_model_dir(out) and not cfg.force:
        print(f"teacher exists at {out} (pass --force to retrain)")
        return out
    torch.manual_seed(cfg.seed)
    source = corpus_source(cfg)
    t0 = time.time()
    tokenizer = build_tokenizer(source, cfg)
    rows = packed_sequences(source, tokenizer, cfg.seq_len, max_tokens=cfg.tokens, text_field=cfg.text_field)
    try:
        val = packed_sequences(source, tokenizer, cfg.seq_len, max_tokens=64 * cfg.seq_len, split="validation",
                               text_field=cfg.text_field)
    except Exception:  # no validation split: hold out the last rows
        rows, val = rows[: -max(1, len(rows) // 20)], rows[-max(1, len(rows) // 20):]
    model = build_model(cfg, tokenizer)
    t_train = time.time()
    history = train(model, rows, cfg)
    train_s = time.time() - t_train
    metrics: dict[str, Any] = {
        "parameters": count_parameters(model), "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1), "steps": history[-1]["step"] + 1,
        "train_tokens": (history[-1]["step"] + 1) * cfg.batch_size * cfg.seq_len,
        "final_train_loss": history[-1]["loss"], "validation_loss": eval_loss(model, val), "data": cfg.data,
    }
    mc_file = Path(cfg.world_dir) / "mmlu" / "mmlu_test.jsonl"
    if cfg.data == WORLD and cfg.eval_items > 0 and mc_file.exists():
        metrics.update(fact_accuracy(model, tokenizer, mc_file, cfg.eval_items))
    card = {"architecture": "LlamaForCausalLM (trained from scratch)", "data": cfg.data,
            **{k: metrics[k] for k in ("parameters", "train_tokens", "train_seconds", "validation_loss")}}
    if "world_mc_accuracy" in metrics:
        card["world MC accuracy (chance 25%)"] = f"{metrics['world_mc_accuracy']:.3f}"
    save_model_dir(model, tokenizer, out, card=card, title="minitron demo teacher")
    write_json(out / "metrics.json", {**metrics, "history": history})
    save_resolved(cfg, out)
    print({k: v for k, v in metrics.items() if k != "history"})
    return out
