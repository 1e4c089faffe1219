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


def assert_generates_greedily(model, input_ids: torch.Tensor, max_new_tokens: int = 4) -> list[int]:
    """``model.generate`` (KV cache and the directory's generation config) gives the tokens that argmax over full
    forward passes gives, at least one, and stops early only on one of its stop tokens. Returns the new tokens."""
    gen = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = gen[0, input_ids.shape[1]:].tolist()
    assert new, "no token generated"
    seq = input_ids[0].tolist()
    with torch.no_grad():
        for t in new:
            assert t == model(torch.tensor([seq])).logits[0, -1].argmax().item(), (seq, new)
            seq.append(t)
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    assert len(new) == max_new_tokens or new[-1] in stops, (new, stops)
    return new


def refused(args: list, match: str, leaves: tuple = ()) -> str:
    """Run the real CLI in-process on a bad input and check the contract of every refusal: exit code 2, exactly
    one ``error:`` line that matches the regex ``match``, no traceback, and none of ``leaves`` (outputs that must
    not exist afterwards, nor their ``.NAME.tmp-*`` siblings). Returns the line the user sees; with
    ``MINITRON_REFUSALS=FILE`` set, each case's test id and line are also appended to FILE (the list of refusals)."""
    import json
    import re

    from typer.testing import CliRunner

    from minitron.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    text = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}, expected 2: {text[-2000:]}\n{res.exception!r}"
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error line: {text[-2000:]}"
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    if os.environ.get("MINITRON_REFUSALS"):
        with open(os.environ["MINITRON_REFUSALS"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                                "line": lines[0]}) + "\n")
    for p in map(Path, leaves):
        assert not p.exists(), f"{p} was left behind"
        assert not list(p.parent.glob(f".{p.name}.tmp-*")), f"a temporary {p.name} was left behind"
    return lines[0]


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


def write_tiny_gguf(path: Path, model, tokenizer, qtype: str = "F32", user_defined: bool = False) -> Path:
    """Write ``model`` (a Llama CausalLM) and its byte-level BPE ``tokenizer`` as a llama.cpp GGUF file.

    Tensors use llama.cpp's names and its q/k row permutation (what ``convert_hf_to_gguf.py`` writes), so
    transformers' GGUF loader must undo it; ``qtype`` "Q8_0" quantizes the 2-D weights. ``user_defined`` marks
    the added tokens that are not special (the tool tokens) USER_DEFINED, as ``convert_hf_to_gguf.py`` does, so
    that the imported tokenizer keeps them whole (left NORMAL, they come back cut into bytes).
    """
    import json

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize

    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    added = {a["content"] for a in spec["added_tokens"] if not a["special"]} if user_defined else set()
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.USER_DEFINED if t in added
                       else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)

    def permute(t, heads):  # llama.cpp's rope layout for q/k rows
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype == "Q8_0" and t.ndim == 2:
            q = GGMLQuantizationType.Q8_0
            w.add_tensor(gg, quantize(t, q), raw_shape=quantize(t, q).shape, raw_dtype=q)
        else:
            w.add_tensor(gg, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """(gguf file, the HF model it was written from): a tiny tied-embedding Llama in F32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tiny_tokenizer), tie_word_embeddings=True, rope_scaling=None)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return write_tiny_gguf(path, model, tiny_tokenizer), model
