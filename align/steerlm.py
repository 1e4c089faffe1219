"""SteerLM (NVIDIA): an attribute regression model, attribute labels, attribute-conditioned SFT, steering at inference.

Two stages of ``minitron align`` (run only when named: ``--stages steer_rm,steer_sft``):

- ``steer_rm``: a regression model (``AutoModelForSequenceClassification``, ``num_labels`` = one output per
  attribute, masked MSE, a plain transformers ``Trainer``) that predicts the attributes of a reply (HelpSteer-style,
  0-4 each) from the whole conversation. It starts from the SFT model (else the input model).
- ``steer_sft``: labels every training reply, writes the labels into the prompt as the system line
  ``Attributes: helpfulness=4 verbosity=2. Give the most helpful answer you can. Answer in a few sentences.``
  (the values, then the same in words: ``minitron.chat_format.attribute_line``), then SFT (TRL's
  ``SFTTrainer``, loss on the reply). At inference the same line asks for a kind of reply; the stage measures that it
  does (``steering``): on held-out prompts, the lowest vs the highest verbosity (answer length) and helpfulness
  (the pairwise reward model ``OUT/rm``'s score, when there is one); and, free of greedy decoding,
  ``length_preference`` and ``helpfulness_preference``: how far the value (0 vs 4) shifts the odds of a short over a
  long held-out reply, of a held-out pair's rejected over its chosen answer.

Where the labels come from (no HelpSteer copy offline; ``ATTRIBUTE_NAMES``):

- ``verbosity``: the length bucket of the reply (word count; quintile cut points of the training replies, so 0-4);
- ``helpfulness``: 4 for the chosen and 0 for the rejected answer of a preference pair; an SFT reply has none, and
  gets the regression model's prediction (rounded, clipped to 0-4) in ``steer_sft``;
- ``steer_sft.variants``: each single-sentence plain answer (the demo world, whose answers have one length per kind
  of prompt) also appears terse (its last word) and padded (restated, plus a closing line), and each longer answer
  (real data) also cut to its first sentence, so that length varies within a prompt and only the attribute line can
  tell the model which length to write.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path
from typing import Any

import torch

from align.common import (StageArgs, StageContext, freeze, last_checkpoint, load_causal_lm, load_tokenizer,
                          measured_once, save_stage, train_history, trl_args)
from align.data import to_dataset
from align.lora import peft_config
from align.scoring import completion_logps, mean_se, sample
from minitron.chat_format import ATTRIBUTE_MAX, ATTRIBUTE_NAMES, attribute_line, with_attributes
from minitron.config import ConfigError, arg
from minitron.scoring import chat_ids, pad_rows, reward_scores

HELPFUL, UNHELPFUL = ATTRIBUTE_MAX, 0  # the labels of a preference pair's chosen and rejected answer
PAD_LINE = "I hope this helps; ask me again if you want to know more about it."


@dataclasses.dataclass
class SteerRMArgs(StageArgs):
    """SteerLM attribute regression model (``--steer-rm.steps 150``)."""

    steps: int = arg(150, "optimizer steps (capped by --max-steps)")
    lr: float = arg(2e-4, "peak learning rate")
    batch_size: int = arg(16, "labelled replies per micro-batch")


@dataclasses.dataclass
class SteerSFTArgs(StageArgs):
    """SteerLM attribute-conditioned SFT (``--steer-sft.steps 200 --steer-sft.variants true``)."""

    steps: int = arg(200, "optimizer steps (capped by --max-steps)")
    lr: float = arg(3e-4, "peak learning rate")
    batch_size: int = arg(16, "labelled replies per micro-batch")
    variants: bool = arg(False, "add a terse and a padded copy of each single-sentence plain answer (the demo world: "
                                "its answers have one length per kind of prompt), a first-sentence copy of longer ones")
    conditioned: bool = arg(True, "write the attribute line into the training prompts (false: the same replies "
                                  "without it, a control that should not steer)")
    eval_prompts: int = arg(32, "held-out prompts per steered attribute (verbosity: plain SFT prompts; "
                                "helpfulness: preference prompts)")
    max_new_tokens: int = arg(96, "reply length limit when measuring the steering")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_prompts < 2 or self.max_new_tokens < 1:
            raise ConfigError("steer_sft.eval_prompts must be >= 2 and max_new_tokens >= 1")


# ----------------------------------------------------------------------------------------------- labels
def reply_text(completion: list[dict]) -> str:
    """The reply as text (tool calls as their JSON), for its word count."""
    parts = []
    for m in completion:
        parts.append(str(m.get("content") or ""))
        parts += [str(c.get("function", c)) for c in m.get("tool_calls") or []]
    return " ".join(parts)


def length_cuts(texts: list[str]) -> list[int]:
    """Word-count cut points of the quintiles of ``texts``: ``verbosity`` buckets a reply by them (0-4)."""
    words = sorted(len(t.split()) for t in texts)
    # the largest word count of each of the first four fifths: a reply of at most cuts[0] words is verbosity 0
    return [words[max(0, len(words) * q // (ATTRIBUTE_MAX + 1) - 1)] for q in range(1, ATTRIBUTE_MAX + 1)]


def verbosity(text: str, cuts: list[int]) -> int:
    return min(ATTRIBUTE_MAX, bisect.bisect_left(cuts, len(text.split())))


def variants(examples: list[dict]) -> list[dict]:
    """The same prompt at several lengths. Each single-sentence plain-text answer (no tools, no tool call) also
    terse (its last word) and padded (restated with a closing line); each longer one also cut to its first
    sentence, when that sentence has 3+ words and under half of the answer's (real data's answers)."""
    out = []
    for ex in examples:
        out.append(ex)
        text = reply_text(ex["completion"]).strip()
        if ex.get("tools") or ex["completion"][0].get("tool_calls") or len(text.split()) < 3:
            continue
        if ". " in text:
            first = text[: text.index(". ") + 1]
            replies = [first] if 3 <= len(first.split()) < len(text.split()) / 2 else []
        else:
            replies = [text.split()[-1], f"{text} To say it once more: {text} {PAD_LINE}"]
        out.extend({**ex, "completion": [{"role": "assistant", "content": reply}]} for reply in replies)
    return out


def labelled(sft_examples: list[dict], pairs: list[dict]) -> list[dict]:
    """Replies with the labels the data gives: ``{"prompt", "completion", ["tools"], "labels": {name: float|None}}``
    (helpfulness from the side of a preference pair, None for an SFT reply; verbosity filled in by ``label_lengths``)."""
    rows = [{**ex, "labels": {"helpfulness": None}} for ex in sft_examples]
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "labels": {"helpfulness": float(HELPFUL)}})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "labels": {"helpfulness": float(UNHELPFUL)}})
    return rows


def label_lengths(rows: list[dict], cuts: list[int]) -> list[dict]:
    for r in rows:
        r["labels"]["verbosity"] = float(verbosity(reply_text(r["completion"]), cuts))
    return rows


def conversation(row: dict) -> list[dict]:
    return row["prompt"] + row["completion"]


# ----------------------------------------------------------------------------------------------- regression model
def load_attribute_model(path: str | Path, tok: Any) -> Any:
    """A sequence classifier with one regression output per attribute (``ATTRIBUTE_NAMES`` order)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=len(ATTRIBUTE_NAMES), problem_type="regression", dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id  # the prediction is read at the last non-pad token
    model.config.id2label = dict(enumerate(ATTRIBUTE_NAMES))
    model.config.label2id = {n: i for i, n in enumerate(ATTRIBUTE_NAMES)}
    return model


def encode(tok: Any, rows: list[dict], max_length: int) -> list[dict]:
    """Token ids of each whole conversation (its last ``max_length`` tokens) and its label vector (NaN = unknown)."""
    out = []
    for r in rows:
        ids = chat_ids(tok, conversation(r), r.get("tools"))[-max_length:]
        labels = [float("nan") if r["labels"].get(n) is None else r["labels"][n] for n in ATTRIBUTE_NAMES]
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([it["input_ids"] for it in items], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["labels"] for it in items])}


def masked_mse(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the known labels only: pred, labels [B, A], NaN labels ignored."""
    known = ~torch.isnan(labels)
    return ((pred.float() - labels.nan_to_num()) ** 2 * known).sum() / known.sum().clamp(min=1)


def _trainer_cls() -> type:
    from transformers import Trainer

    class AttributeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            loss = masked_mse(out.logits, labels.to(out.logits.device))
            return (loss, out) if return_outputs else loss

    return AttributeTrainer


@torch.no_grad()
def predict(model: Any, tok: Any, rows: list[dict], max_length: int, batch_size: int = 16) -> torch.Tensor:
    """The model's attribute predictions for ``rows``: [N, A]."""
    model.eval()
    device = next(model.parameters()).device
    enc = encode(tok, rows, max_length)
    preds = []
    for s in range(0, len(enc), batch_size):
        ids, mask = pad_rows([e["input_ids"] for e in enc[s:s + batch_size]], tok.pad_token_id)
        preds.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
    return torch.cat(preds)


def attribute_errors(model: Any, tok: Any, rows: list[dict], max_length: int) -> dict[str, float]:
    """Per attribute: mean squared error (± s.e.) on the rows that have the label; ``helpfulness_pair_accuracy``:
    share of held-out preference pairs (consecutive chosen/rejected rows) where chosen is predicted more helpful."""
    pred = predict(model, tok, rows, max_length)
    labels = torch.tensor([[float("nan") if r["labels"].get(n) is None else r["labels"][n] for n in ATTRIBUTE_NAMES]
                           for r in rows])
    out: dict[str, float] = {}
    for i, name in enumerate(ATTRIBUTE_NAMES):
        known = ~torch.isnan(labels[:, i])
        if known.any():
            out[f"{name}_mse"], out[f"{name}_mse_se"] = mean_se((pred[known, i] - labels[known, i]) ** 2)
    out["mse"] = sum(out[f"{n}_mse"] for n in ATTRIBUTE_NAMES if f"{n}_mse" in out) / len(ATTRIBUTE_NAMES)
    h = ATTRIBUTE_NAMES.index("helpfulness")
    pairs = [(a, a + 1) for a in range(len(rows) - 1)  # ``labelled`` puts each chosen answer before its rejected one
             if rows[a]["labels"]["helpfulness"] == HELPFUL and rows[a + 1]["labels"]["helpfulness"] == UNHELPFUL]
    if pairs:
        wins = torch.tensor([float(pred[a, h] > pred[b, h]) for a, b in pairs])
        out["helpfulness_pair_accuracy"], out["helpfulness_pair_accuracy_se"] = mean_se(wins)
    return out


def train_rm(ctx: StageContext, args: SteerRMArgs, model_dir: str | Path, sft: tuple, pref: tuple) -> Path:
    """Train the attribute regression model from ``model_dir``; write ``OUT/steer_rm``."""
    from transformers import TrainingArguments

    tok = load_tokenizer(model_dir)
    train_rows, held_rows, cuts = _rm_rows(sft, pref)
    model = load_attribute_model(model_dir, tok)
    before = measured_once(ctx, "steer_rm", "errors", lambda: attribute_errors(model, tok, held_rows, ctx.max_length))
    freeze(model, args)
    lora = peft_config(ctx.lora, "SEQ_CLS")
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    config = trl_args(TrainingArguments, args, ctx, "steer_rm", remove_unused_columns=False)
    trainer = _trainer_cls()(model=model, args=config, train_dataset=encode(tok, train_rows, ctx.max_length),
                             data_collator=_Collate(tok.pad_token_id), callbacks=ctx.callbacks or None)
    trainer.model_accepts_loss_kwargs = False  # the loss is a mean per micro-batch: let the Trainer divide by accum
    resume = last_checkpoint(ctx, "steer_rm")
    trainer.train(resume_from_checkpoint=resume)
    after = attribute_errors(trainer.model, tok, held_rows, ctx.max_length)
    metrics = {"stage": "steer_rm", "attributes": list(ATTRIBUTE_NAMES), "mse_before": before["mse"],
               **{f"{k}_before": v for k, v in before.items() if k != "mse"}, **after,
               "verbosity_word_cuts": cuts, "train_replies": len(train_rows), "eval_replies": len(held_rows),
               "eval_n": len(held_rows), "steps": trainer.state.global_step, "resumed_from": resume,
               "data": {"sft": sft[2], "pref": pref[2]}, "history": train_history(trainer)}
    return save_stage(trainer.model, tok, ctx, "steer_rm", metrics, args, str(model_dir), "SteerLM attribute model",
                      f"Regression model (one output per attribute: {', '.join(ATTRIBUTE_NAMES)}; 0-4) trained with "
                      "masked MSE on attribute-labelled replies (SteerLM).")


def _rm_rows(sft: tuple, pref: tuple) -> tuple[list, list, list[int]]:
    """(train rows, held-out rows, verbosity cut points): SFT replies and both sides of every preference pair."""
    train = labelled(sft[0], pref[0])
    cuts = length_cuts([reply_text(r["completion"]) for r in train])
    return label_lengths(train, cuts), label_lengths(labelled(sft[1], pref[1]), cuts), cuts


# ----------------------------------------------------------------------------------------------- conditioned SFT
def steer_rows(rows: list[dict], attribute_model: Any, tok: Any, max_length: int) -> tuple[list[dict], int]:
    """Fill each missing label with the attribute model's prediction (rounded, clipped to 0..4); (rows, filled)."""
    missing = [r for r in rows if any(r["labels"].get(n) is None for n in ATTRIBUTE_NAMES)]
    if missing:
        pred = predict(attribute_model, tok, missing, max_length).round().clamp(0, ATTRIBUTE_MAX)
        for r, p in zip(missing, pred.tolist()):
            r["labels"] = {n: p[i] if r["labels"].get(n) is None else r["labels"][n]
                           for i, n in enumerate(ATTRIBUTE_NAMES)}
    return rows, len(missing)


def to_examples(rows: list[dict], conditioned: bool) -> list[dict]:
    """Prompt/completion examples, the labels written as the attribute line of the system turn."""
    out = []
    for r in rows:
        values = {n: int(r["labels"][n]) for n in ATTRIBUTE_NAMES}
        ex = {"prompt": with_attributes(r["prompt"], values if conditioned else None), "completion": r["completion"]}
        if r.get("tools"):
            ex["tools"] = r["tools"]
        out.append(ex)
    return out


def plain_examples(examples: list[dict], n: int) -> list[dict]:
    """Up to ``n`` held-out SFT examples answered in plain text (no tools): where verbosity is measured."""
    return [ex for ex in examples if not ex.get("tools") and not ex["completion"][0].get("tool_calls")][:n]


def steering(policy: Any, tok: Any, prompts: dict[str, list[list[dict]]], neutral: dict[str, int],
             rm: Any = None, rm_tok: Any = None, max_new_tokens: int = 96, seed: int = 0) -> dict[str, Any]:
    """Greedy replies to held-out ``prompts[attribute]`` asked with that attribute at 0 and at 4 (the others at
    ``neutral``, e.g. ``typical_values`` of the training labels): per attribute and value the mean reply length in tokens and, with ``rm``, the pairwise reward
    model's mean score of the reply to the plain prompt, each ± s.e.; ``length_ratio`` = high / low and
    ``rm_diff`` = mean paired score difference high - low, with its s.e. (``rm_diff_in_se`` = diff / s.e.)."""
    table: dict[str, Any] = {}
    for name, plist in prompts.items():
        row: dict[str, Any] = {"n": len(plist)}
        scores = {}
        for label, value in (("low", 0), ("high", ATTRIBUTE_MAX)):
            values = {**neutral, name: value}
            out = sample(policy, tok, [with_attributes(p, values) for p in plist], max_new_tokens, seed,
                         temperature=0.0)
            lengths = torch.tensor([float(len(s["completion_ids"])) for s in out])  # tokens, the stop token included
            row[f"length_{label}"], row[f"length_{label}_se"] = mean_se(lengths)
            row[f"stopped_{label}"] = sum(s["stopped"] for s in out) / len(out)
            if rm is not None:
                scores[label] = reward_scores(rm, rm_tok, [p + [{"role": "assistant", "content": s["text"]}]
                                                           for p, s in zip(plist, out)])
                row[f"rm_{label}"], row[f"rm_{label}_se"] = mean_se(scores[label])
            row[f"example_{label}"] = out[0]["text"][:200]
        row["length_ratio"] = row["length_high"] / max(row["length_low"], 1e-9)
        if scores:
            row["rm_diff"], row["rm_diff_se"] = mean_se(scores["high"] - scores["low"])
            row["rm_diff_in_se"] = row["rm_diff"] / max(row["rm_diff_se"], 1e-9)
        table[name] = row
    return table


def odds_shift(policy: Any, tok: Any, triples: list[tuple], name: str, neutral: dict[str, int]) -> dict[str, float]:
    """Whether the value of attribute ``name`` alone moves the model between two replies, free of what greedy
    decoding makes of it: over ``triples`` (prompt, the reply a low value asks for, the one a high value asks for),
    the log-odds of the low reply against the high one at ``name`` 0 minus the same at 4, in nats (``gap`` ±
    ``gap_se``, ``n``). Positive: the value steers toward its kind of reply; about 0: the attribute line is not
    learnt."""
    if not triples:
        return {"gap": float("nan"), "gap_se": float("nan"), "n": 0}
    odds = {}
    for value in (0, ATTRIBUTE_MAX):
        rows = [{"prompt": with_attributes(p, {**neutral, name: value}), "low": lo, "high": hi} for p, lo, hi in triples]
        odds[value] = completion_logps(policy, tok, rows, "low") - completion_logps(policy, tok, rows, "high")
    gap, gap_se = mean_se(odds[0] - odds[ATTRIBUTE_MAX])
    return {"gap": gap, "gap_se": gap_se, "n": len(triples)}


def length_preference(policy: Any, tok: Any, examples: list[dict], neutral: dict[str, int]) -> dict[str, float]:
    """``odds_shift`` of verbosity over held-out plain ``examples`` that ``variants`` gives a shorter copy of: the
    shortest copy against the longest."""
    triples = []
    for ex in examples:
        copies = sorted(variants([ex]), key=lambda c: len(reply_text(c["completion"]).split()))
        if len(copies) > 1:  # ``variants`` leaves replies under 3 words alone
            triples.append((ex["prompt"], copies[0]["completion"], copies[-1]["completion"]))
    return odds_shift(policy, tok, triples, "verbosity", neutral)


def helpfulness_preference(policy: Any, tok: Any, pairs: list[dict], neutral: dict[str, int]) -> dict[str, float]:
    """``odds_shift`` of helpfulness over held-out preference ``pairs``: the rejected answer against the chosen."""
    return odds_shift(policy, tok, [(p["prompt"], p["rejected"], p["chosen"]) for p in pairs], "helpfulness", neutral)


def preference_lines(short: dict[str, float], helpful: dict[str, float] | None = None) -> str:
    """The probes in words: verbosity (short over long reply) and, when measured, helpfulness (rejected over chosen)."""
    lines = [f"Log-odds of a short over a long held-out reply, verbosity 0 minus 4: {short['gap']:.3f} ± "
             f"{short['gap_se']:.3f} nats (n {short['n']})."]
    if helpful:
        lines.append(f"Log-odds of the rejected over the chosen held-out answer, helpfulness 0 minus 4: "
                     f"{helpful['gap']:.3f} ± {helpful['gap_se']:.3f} nats (n {helpful['n']}).")
    return "\n".join(lines)


def steering_markdown(table: dict[str, Any]) -> str:
    """The steering table: per attribute, n, reply length and RM score at 0 and at 4 (± s.e.)."""
    lines = ["| attribute (0 vs 4) | n | length at 0 | length at 4 | ratio | RM at 0 | RM at 4 | RM diff (in s.e.) |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k]:.2f} ± {r[k + '_se']:.2f}" if k in r else "-"  # noqa: E731
    for name, r in table.items():
        diff = f"{r['rm_diff']:.3f} ± {r['rm_diff_se']:.3f} ({r['rm_diff_in_se']:.1f})" if "rm_diff" in r else "-"
        lines.append(f"| {name} | {r['n']} | {f(r, 'length_low')} | {f(r, 'length_high')} | {r['length_ratio']:.2f} "
                     f"| {f(r, 'rm_low')} | {f(r, 'rm_high')} | {diff} |")
    return "\n".join(lines)


def eval_sets(args: SteerSFTArgs, sft: tuple, pref: tuple) -> tuple[list[dict], list[dict]]:
    """The held-out examples of the steering check and its probes: plain SFT examples (verbosity), preference pairs
    (helpfulness), up to ``eval_prompts`` of each."""
    return plain_examples(sft[1], args.eval_prompts), pref[1][: args.eval_prompts]


def train_sft(ctx: StageContext, args: SteerSFTArgs, model_dir: str | Path, attribute_dir: Path, sft: tuple,
              pref: tuple) -> Path:
    """Label the replies, SFT ``model_dir`` on them with the attribute line, measure the steering; write
    ``OUT/steer_sft``."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(model_dir)
    train_ex = variants(sft[0]) if args.variants else sft[0]
    held_ex = variants(sft[1]) if args.variants else sft[1]
    train_rows = labelled(train_ex, pref[0])
    cuts = length_cuts([reply_text(r["completion"]) for r in train_rows])
    label_lengths(train_rows, cuts)
    held_rows = label_lengths(labelled(held_ex, pref[1]), cuts)

    def fill() -> dict[str, Any]:
        attr_tok = load_tokenizer(attribute_dir)
        attr_model = load_attribute_model(attribute_dir, attr_tok)
        _, n_train = steer_rows(train_rows, attr_model, attr_tok, ctx.max_length)
        _, n_held = steer_rows(held_rows, attr_model, attr_tok, ctx.max_length)
        return {"train": [r["labels"] for r in train_rows], "eval": [r["labels"] for r in held_rows],
                "predicted": n_train + n_held}

    labels = measured_once(ctx, "steer_sft", "labels", fill)  # a resumed run trains on the same labels
    for rows, key in ((train_rows, "train"), (held_rows, "eval")):
        for r, lab in zip(rows, labels[key]):
            r["labels"] = lab
    model = freeze(load_causal_lm(model_dir, tok), args)
    config = trl_args(SFTConfig, args, ctx, "steer_sft", completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(to_examples(train_rows, args.conditioned)),
                         eval_dataset=to_dataset(to_examples(held_rows, True)), processing_class=tok,
                         peft_config=peft_config(ctx.lora), callbacks=ctx.callbacks or None)
    resume = last_checkpoint(ctx, "steer_sft")
    before = measured_once(ctx, "steer_sft", "eval_loss", lambda: trainer.evaluate().get("eval_loss"))
    trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate().get("eval_loss")  # None when no held-out example fits max_length
    rm_dir = ctx.out / "rm"
    neutral = typical_values(train_rows)
    plain, pairs = eval_sets(args, sft, pref)
    prompts = {"verbosity": [ex["prompt"] for ex in plain], "helpfulness": [p["prompt"] for p in pairs]}
    table = steering(trainer.model.eval(), tok, prompts, neutral, *_rm(rm_dir), args.max_new_tokens, ctx.seed)
    prefer_short = length_preference(trainer.model, tok, plain, neutral)
    prefer_helpful = helpfulness_preference(trainer.model, tok, pairs, neutral)
    metrics = {"stage": "steer_sft", "eval_loss_before": before, "eval_loss": after, "steering": table, "steering_other_values": neutral,
               "verbosity_ratio": table["verbosity"]["length_ratio"],
               "helpfulness_rm_diff_in_se": table["helpfulness"].get("rm_diff_in_se"),
               "verbosity_short_preference": prefer_short, "helpfulness_preference": prefer_helpful,
               "scored_by": str(rm_dir) if rm_dir.is_dir() else None, "conditioned": args.conditioned,
               "labels_predicted": labels["predicted"], "verbosity_word_cuts": cuts,
               "label_counts": _counts(train_rows), "train_examples": len(train_rows), "eval_examples": len(held_rows),
               "eval_n": len(held_rows), "steps": trainer.state.global_step, "resumed_from": resume,
               "data": {"sft": sft[2], "pref": pref[2]}, "history": train_history(trainer)}
    summary = steering_markdown(table) + "\n\n" + preference_lines(prefer_short, prefer_helpful)
    print("[steer_sft] steering on held-out prompts:\n" + summary)
    return save_stage(trainer.model, tok, ctx, "steer_sft", metrics, args, str(model_dir), "SteerLM model",
                      "Attribute-conditioned SFT (SteerLM). Ask for a kind of reply with the system-prompt line "
                      f"`{attribute_line({'helpfulness': 4, 'verbosity': 0})}` (integers 0-4, then the same in "
                      "words; `minitron chat`: `/attributes helpfulness=4 verbosity=0`).\n\n" + summary)


def _rm(rm_dir: Path) -> tuple[Any, Any]:
    """The pairwise reward model of ``OUT/rm`` and its tokenizer, or (None, None) when there is none."""
    from align.reward import load_reward_model

    if not (rm_dir / "config.json").is_file():
        return None, None
    rm_tok = load_tokenizer(rm_dir)
    return load_reward_model(rm_dir, rm_tok).eval(), rm_tok


def typical_values(rows: list[dict]) -> dict[str, int]:
    """The most common training value of each attribute: what the others are asked at while one is steered."""
    counts = _counts(rows)
    return {n: max(range(ATTRIBUTE_MAX + 1), key=lambda v: counts[n][v]) for n in ATTRIBUTE_NAMES}


def _counts(rows: list[dict]) -> dict[str, list[int]]:
    """How many training replies carry each value 0..4 of each attribute."""
    return {n: [sum(int(r["labels"][n]) == v for r in rows) for v in range(ATTRIBUTE_MAX + 1)] for n in ATTRIBUTE_NAMES}
