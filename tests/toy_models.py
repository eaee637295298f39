"""Tiny models built in code and toy rollouts for the gradient tests (dense architectures and MoE)."""

import numpy as np
import torch

from gradsel.gradients import ProblemRollouts, exact_parameters, exact_problem_gradient, group_advantages, resolve_units

LOSS_AGG = "seq-mean-token-mean"


def toy_groups(seed=0, n_problems=6, k=4, vocab=18, zero_at=(2,)):
    """Problems with varied prompt/response lengths (so batches are padded and packed)."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_problems):
        plen = int(rng.integers(3, 7))
        prompt = rng.integers(4, vocab, plen).tolist()
        responses = [rng.integers(4, vocab, int(rng.integers(1, 5))).tolist() + [2] for _ in range(k)]
        rewards = [1.0] * k if i in zero_at else rng.integers(0, 2, k).astype(float).tolist()
        if i not in zero_at and len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        g = ProblemRollouts(f"p{i}", [prompt] * k, responses, rewards)
        g.advantages = group_advantages(rewards)
        groups.append(g)
    return groups


def exact_unit_gradients(model, group, spec):
    """[(unit, its exact gradient as (d_out, d_in), or (n_experts, d_out, d_in) for experts)],
    from one full backward pass over the problem (float64)."""
    units = resolve_units(model, spec.modules)
    params = exact_parameters(model, [u.parameter_name for u in units])
    flat = exact_problem_gradient(model, group, params, loss_agg=LOSS_AGG, pad_id=0).double()
    for p in model.parameters():
        p.requires_grad_(False)
    return [
        (u, u.gradient_matrix(g.reshape(p.shape)))
        for u, p, g in zip(units, params, flat.split([p.numel() for p in params]))
    ]


def tiny_config(arch):
    import transformers

    common = dict(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    extra = {"head_dim": 8} if arch == "qwen3" else {}
    return cls(**common, **extra)


def tiny_moe(arch):
    """Mixtral and Qwen3-MoE (router + fused experts), Qwen2-MoE (plus a shared expert whose
    Linears see the flattened tokens), GPT-OSS (experts stored transposed, with biases and their own gate) and
    DeepSeek-V3 (a dense first layer, grouped sigmoid routing, latent attention whose kv_b_proj
    sees (B, 1, T, d))."""
    import transformers
    from transformers import AutoModelForCausalLM

    common = dict(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = {
        "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
        ),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8
        ),
        "gpt_oss": lambda: transformers.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **(common | {"num_key_value_heads": 4}),
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    }[arch]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()
