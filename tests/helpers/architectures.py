"""Tiny in-process models of the attention layouts users bring (no downloads), peaked like the contract models.

Each covers something the cache must get right: attention soft-capping and alternating sliding layers (Gemma-2),
per-layer-type rotary frequencies with q/k norms, head size 256 and one KV head (Gemma-3), partial rotary
(Phi-3, GPT-NeoX), every rope-scaling type of Llama, multi-query attention, and a value head size different from
the key's (DeepSeek-V3's latent attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from tests.helpers.models import COMMON, DECODER, PEAKED_INIT, build

_PEAKED = dict(COMMON, initializer_range=PEAKED_INIT)
_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [1.0 + i / 4 for i in range(8)],
        "original_max_position_embeddings": 64,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def _llama_rope(kind: str) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        config = LlamaConfig(
            **DECODER,
            **_PEAKED,
            max_position_embeddings=256,
            rope_parameters={"rope_theta": 10000.0, **_ROPE[kind]},
        )
        return build(LlamaForCausalLM, config)

    return make


def gemma2() -> torch.nn.Module:
    config = Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=16, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        attn_implementation="eager", **_PEAKED,
    )  # fmt: skip
    return build(Gemma2ForCausalLM, config)


def gemma3() -> torch.nn.Module:
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, sliding_window=16, sliding_window_pattern=2, **_PEAKED,
    )  # fmt: skip
    return build(Gemma3ForCausalLM, config)


def phi3() -> torch.nn.Module:
    config = Phi3Config(**DECODER, partial_rotary_factor=0.5, **_PEAKED)
    return build(Phi3ForCausalLM, config)


def gpt_neox() -> torch.nn.Module:
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           rotary_pct=0.25, **_PEAKED)  # fmt: skip
    return build(GPTNeoXForCausalLM, config)


def llama_mqa() -> torch.nn.Module:
    return build(LlamaForCausalLM, LlamaConfig(**{**DECODER, "num_key_value_heads": 1}, **_PEAKED))


def deepseek_v3() -> torch.nn.Module:
    config = DeepseekV3Config(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        **_PEAKED,
    )  # fmt: skip
    return build(DeepseekV3ForCausalLM, config)


ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "gemma2_softcap": gemma2,
    "gemma3_like": gemma3,
    "phi3_partial_rotary": phi3,
    "gpt_neox_partial_rotary": gpt_neox,
    "llama_mqa": llama_mqa,
    "deepseek_v3_value_head": deepseek_v3,
    **{f"llama_rope_{kind}": _llama_rope(kind) for kind in _ROPE},
}
