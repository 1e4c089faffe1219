"""Architecture adapters: where a decoder family keeps its weights, and its attention (GQA) layout.

Pruning and importance code never hard-codes a family: it asks ``get_adapter(config)`` for the module
paths (embeddings, layers, q/k/v/o, gate/up/down, norms, lm_head) and ``Layout.from_config(config)`` for
the shape (heads, KV heads, head_dim, biases, q/k norms, tied embeddings). Supported: Llama (incl. the
Llama-3.1 rope scaling, which pruning leaves untouched because head_dim never changes), Mistral, Qwen2,
Qwen3. Query head ``h`` reads KV head ``h // (heads // kv_heads)`` (transformers' ``repeat_kv`` order).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from minitron.config import MinitronError


class UnsupportedArchitecture(MinitronError):
    """A model family that no adapter describes."""


@dataclass(frozen=True)
class Adapter:
    """Module paths of one decoder family (relative to the CausalLM; per-layer paths relative to a layer)."""

    family: str
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    qk_norms: tuple[str, ...] = ()  # RMSNorms over head_dim (Qwen3): never sliced, head_dim is kept

    def layer_prefix(self, i: int) -> str:
        """State-dict prefix of decoder layer ``i`` (``model.layers.3.``)."""
        return f"{self.layers}.{i}."

    def layer_modules(self, model: Any) -> Any:
        """The ``nn.ModuleList`` of decoder layers of a loaded model."""
        return model.get_submodule(self.layers)


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama"),
    "mistral": Adapter("mistral"),
    "qwen2": Adapter("qwen2"),
    "qwen3": Adapter("qwen3", qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
}


def get_adapter(config: Any) -> Adapter:
    """The adapter for ``config.model_type``; an unsupported family raises naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported model_type values: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


@dataclass(frozen=True)
class Layout:
    """The shape of a decoder: widths, GQA layout, biases, tied embeddings."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> "Layout":
        family = get_adapter(config).family
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attn_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = {"qwen2": True, "mistral": False}.get(family, attn_bias)
        o_bias = {"qwen2": False, "mistral": False}.get(family, attn_bias)
        return cls(family=family, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, qkv_bias=qkv_bias,
                   o_bias=o_bias, mlp_bias=bool(getattr(config, "mlp_bias", False)) and family == "llama",
                   qk_norm=family == "qwen3", tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **shape: int) -> "Layout":
        return dataclasses.replace(self, **shape)

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        return attn + mlp + 2 * h  # + the two RMSNorms

    def num_params(self) -> int:
        """Total parameters (tied embeddings counted once), equal to ``minitron.io.count_parameters``."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tied else 2) + self.num_hidden_layers * self.layer_params() + self.hidden_size

    def non_embedding_params(self) -> int:
        """Parameters outside embeddings and lm_head (what sets the forward cost per token)."""
        return self.num_hidden_layers * self.layer_params() + self.hidden_size


def pruned_config(config: Any, layout: Layout, kept_layers: list[int] | None = None) -> Any:
    """A copy of ``config`` with the shape of ``layout`` (head_dim explicit), other fields (rope...) kept."""
    cfg = copy.deepcopy(config)
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_hidden_layers"):
        setattr(cfg, name, getattr(layout, name))
    if kept_layers is not None and getattr(cfg, "layer_types", None):
        cfg.layer_types = [config.layer_types[i] for i in kept_layers]
    if kept_layers is not None and getattr(cfg, "max_window_layers", None) is not None:
        # Qwen2/3: layers at index >= max_window_layers use the sliding window; keep each kept layer's kind.
        cfg.max_window_layers = sum(1 for i in kept_layers if i < config.max_window_layers)
    return cfg
