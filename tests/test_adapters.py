"""Architecture adapters: module paths and GQA layout of Llama (Llama-3.1 rope), Mistral, Qwen2, Qwen3."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import tiny_config
from minitron.adapters import ADAPTERS, Layout, UnsupportedArchitecture, get_adapter, pruned_config
from minitron.config import MinitronError
from minitron.io import count_parameters

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_paths_and_layout_match_the_model(arch, tied):
    config = tiny_config(arch, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    ad, lay = get_adapter(config), Layout.from_config(config)
    assert lay.num_params() == count_parameters(model)
    assert model.get_submodule(ad.embed).weight.shape == (512, 64)
    assert model.get_submodule(ad.lm_head).weight.shape == (512, 64)
    assert model.get_submodule(ad.final_norm).weight.shape == (64,)
    assert (model.get_submodule(ad.lm_head).weight is model.get_submodule(ad.embed).weight) == tied == lay.tied
    layers = ad.layer_modules(model)
    assert len(layers) == lay.num_hidden_layers == 4
    layer = layers[0]
    q, k, o = (layer.get_submodule(p) for p in (ad.q, ad.k, ad.o))
    assert q.weight.shape == (lay.num_attention_heads * lay.head_dim, 64) == (64, 64)
    assert k.weight.shape == (lay.num_key_value_heads * lay.head_dim, 64) == (32, 64)
    assert o.weight.shape == (64, 64)
    assert (q.bias is not None) == lay.qkv_bias and (o.bias is not None) == lay.o_bias
    assert layer.get_submodule(ad.gate).weight.shape == layer.get_submodule(ad.up).weight.shape == (128, 64)
    assert layer.get_submodule(ad.down).weight.shape == (64, 128)
    for norm in (ad.attn_norm, ad.mlp_norm):
        assert layer.get_submodule(norm).weight.shape == (64,)
    assert [layer.get_submodule(n).weight.shape for n in ad.qk_norms] == [(16,)] * (2 if lay.qk_norm else 0)
    assert lay.group_size == 2
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(ad.layer_prefix(1))) == lay.layer_params()


def test_family_specifics():
    assert Layout.from_config(tiny_config("qwen2")).qkv_bias and not Layout.from_config(tiny_config("qwen2")).o_bias
    assert Layout.from_config(tiny_config("qwen3")).qk_norm
    llama = Layout.from_config(tiny_config("llama", attention_bias=True, mlp_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    assert not Layout.from_config(tiny_config("mistral")).qkv_bias


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="gpt2.*llama, mistral, qwen2, qwen3") as e:
        get_adapter(GPT2Config())
    assert isinstance(e.value, MinitronError)
    assert set(ADAPTERS) == set(ARCHS)


def test_pruned_config_keeps_rope_and_explicit_head_dim():
    config = tiny_config("llama")  # Llama-3.1 rope scaling (rope_type llama3)
    lay = Layout.from_config(config).replace(hidden_size=48, num_hidden_layers=2)
    new = pruned_config(config, lay, kept_layers=[0, 3])
    assert new.hidden_size == 48 and new.head_dim == 16 and new.num_hidden_layers == 2
    assert new.to_dict().get("rope_parameters") == config.to_dict().get("rope_parameters")
    assert new.to_dict()["rope_parameters"]["rope_type"] == "llama3"
    assert config.hidden_size == 64  # the source config is not modified
    model = AutoModelForCausalLM.from_config(new)  # head_dim != hidden / heads runs
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


def test_pruned_config_slices_layer_types():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    new = pruned_config(config, Layout.from_config(config).replace(num_hidden_layers=2), kept_layers=[1, 3])
    assert new.layer_types == ["full_attention", "sliding_attention"]
