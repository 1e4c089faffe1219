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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from minitron.config import ConfigError, arg, save_resolved
from minitron.fingerprint import of_config, of_path, record, up_to_date
from minitron.scoring import continuation_logprobs
from minitron.data import iter_texts, read_jsonl
from minitron.io import count_parameters, is_model_dir, read_json, save_model_dir, write_json, write_model_card

WORLD = "world"


@dataclass
class TeacherConfig:
    out: str = arg("runs/demo/teacher", "output model directory")
    data: str = arg(WORLD, "training corpus: 'world' (the demo world), a file/dir path, or a datasets name")
    world_dir: str = arg("runs/demo/world", "where the demo world lives (generated if missing)")
    text_field: str = arg("text", "JSON field holding the document text")
    vocab_size: int = arg(1024, "BPE vocabulary size (specials included)")
    tokenizer_chars: int = arg(2_000_000, "characters of the corpus used to train the tokenizer")
    tokenizer_data: list[str] = arg([], "files whose lines also train the tokenizer, not the model (the demo adds its "
                                        "chat/tool SFT data: JSON and chat markup get merges, tool prompts shrink ~2x)")
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
    save_every: int = arg(50, "checkpoint every N steps (an interrupted run resumes from the last one)")
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
    """The corpus path: the demo world's corpus (an existing world as it is, else one generated with the default
    config) or ``cfg.data``."""
    if cfg.data != WORLD:
        return cfg.data
    from minitron.world import WorldConfig, WorldFiles, ensure_world

    world = Path(cfg.world_dir)
    if not (world / "world_config.json").exists():
        ensure_world(WorldConfig(out=str(world)))
    return str(WorldFiles(world).corpus)


def build_tokenizer(source: str, cfg: TeacherConfig) -> Any:
    """Train the BPE on the first ``tokenizer_chars`` characters of the corpus, plus the ``tokenizer_data`` lines."""
    from minitron.tokenizer import train_bpe

    missing = [f for f in cfg.tokenizer_data if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"tokenizer_data file(s) not found: {missing} (build the world first: `minitron world`)")

    def sample():
        total = 0
        for text in iter_texts(source, "train", cfg.text_field):
            for i in range(0, len(text), 10_000):  # bounded pieces keep the trainer's memory flat
                yield text[i : i + 10_000]
            total += len(text)
            if total >= cfg.tokenizer_chars:
                break
        for path in cfg.tokenizer_data:
            with open(path, encoding="utf-8") as fh:
                yield from fh

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


@torch.no_grad()
def fact_accuracy(model: torch.nn.Module, tokenizer: Any, mc_file: str | Path, limit: int = 200,
                  batch_size: int = 64) -> dict[str, float]:
    """Cloze multiple choice on world facts: the choice with the highest log-likelihood after the fact's stem.

    "The favorite color of X is" + " red" (the separating space goes on the choice, see NOTES.md).
    Chance is 25% (four choices). All (stem, choice) pairs are scored in right-padded batches.
    """
    from minitron.world import ATTRIBUTES

    items = list(itertools.islice(read_jsonl(mc_file), limit))
    pairs = []  # (context ids, continuation ids) for every choice of every item
    for item in items:
        attr = item["subject"].removeprefix("world_")
        name = _entity_from_question(item["question"], ATTRIBUTES[attr]["question"])
        stem = ATTRIBUTES[attr]["answer"].split("{v}")[0].format(n=name).rstrip()
        ctx = [tokenizer.bos_token_id] + tokenizer(stem, add_special_tokens=False)["input_ids"]
        pairs += [(ctx, tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
    scores = continuation_logprobs(model, [c for c, _ in pairs], [x for _, x in pairs], tokenizer.pad_token_id or 0,
                                   batch_size).tolist()
    correct = sum(int(max(range(4), key=lambda c: scores[4 * k + c]) == item["answer"]) for k, item in enumerate(items))
    n = len(items)
    acc = correct / max(1, n)
    return {"world_mc_accuracy": acc, "world_mc_stderr": math.sqrt(acc * (1 - acc) / max(1, n)), "world_mc_n": n,
            "chance": 0.25}


def _entity_from_question(question: str, template: str) -> str:
    before, after = template.split("{n}")
    return question[len(before) : len(question) - len(after)]


def run(cfg: TeacherConfig) -> Path:
    """Train tokenizer + teacher and save them as a standard HF model directory.

    The weights are trained by the shared LM trainer (``minitron.lm_train``: the LM loss from a random
    initialisation), so the teacher checkpoints every ``save_every`` steps and an interrupted run resumes.
    """
    from minitron.lm_train import LMTrainConfig, run as train_lm

    out = Path(cfg.out)
    fp = of_config(cfg)
    if is_model_dir(out) and (out / "metrics.json").exists() and up_to_date(out, fp, "teacher", cfg.force):
        return out
    torch.manual_seed(cfg.seed)
    source = corpus_source(cfg)
    t0 = time.time()
    init = out.with_name(f".{out.name}-init")
    if cfg.force or not is_model_dir(init) or of_path(init) != fp["fingerprint"]:  # the init of this config
        tokenizer = build_tokenizer(source, cfg)
        save_model_dir(build_model(cfg, tokenizer), tokenizer, init, card={"init": "random"}, title="teacher init")
        record(init, fp)
    train_lm(LMTrainConfig(
        model=str(init), out=str(out), data=source, text_field=cfg.text_field, tokens=cfg.tokens, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 10,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, seed=cfg.seed, max_steps=cfg.max_steps,
        save_every=cfg.save_every, force=cfg.force), fp)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = read_json(out / "metrics.json")
    metrics: dict[str, Any] = {"parameters": count_parameters(model), "total_seconds": round(time.time() - t0, 1),
                               "data": cfg.data, **trained}
    from minitron.world import WorldFiles

    mc_file = WorldFiles(Path(cfg.world_dir)).mmlu_test
    if cfg.data == WORLD and cfg.eval_items > 0 and mc_file.exists():
        metrics.update(fact_accuracy(model, tokenizer, mc_file, cfg.eval_items))
    card = {"architecture": "LlamaForCausalLM (trained from scratch)", "data": cfg.data,
            "parameters": f"{metrics['parameters']:,}", "train tokens": f"{trained['tokens']:,}",
            "train seconds": trained["train_time_s"], "validation loss": f"{trained.get('final_val_ce', float('nan')):.4f}"}
    if "world_mc_accuracy" in metrics:
        card["world MC accuracy (chance 25%)"] = f"{metrics['world_mc_accuracy']:.3f}"
    write_model_card(out, "minitron demo teacher", card)
    write_json(out / "metrics.json", metrics)
    save_resolved(cfg, out)
    shutil.rmtree(init, ignore_errors=True)
    print({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
    return out
