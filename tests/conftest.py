"""Shared fixtures: tiny tokenizers and tiny random models of each supported family, offline, on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data sets beside the checkout); absent here")
    return path


TINY_TEXT = [
    f"The {a} of {n} is {v}. {n} lives in {c} and likes {v} things; ask {n} about {c}."
    for n in ["Zorvath", "Mirel", "Quen", "Atha", "Borin", "Celis"]
    for a, v, c in [("color", "red", "Paris"), ("animal", "fox", "Lima"), ("food", "bread", "Oslo")]
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE with the project chat template."""
    from minitron.tokenizer import train_bpe

    return train_bpe(TINY_TEXT, vocab_size=512)


TINY_ARCHS = {
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
}


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """A tiny config of ``arch``: hidden 64, 4 layers, 4 heads / 2 KV heads, head_dim 16 (explicit), MLP 128."""
    from transformers import AutoConfig

    kw = dict(TINY_ARCHS[arch])
    model_type = kw.pop("model_type")
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(kw)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def make_tiny_model_dir(path: Path, tokenizer, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of ``arch`` with ``tokenizer`` as a standard HF directory at ``path``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from minitron.chat_format import stop_token_ids

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=stop_token_ids(tokenizer),
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny Llama directory (read-only for tests: copy it before changing it)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", tiny_tokenizer)
