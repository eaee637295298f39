"""The shared-prompt pass: a problem's responses over one copy of its prompt give the same
vectors, alignment dots and exact gradients as today's one sequence per rollout, on every
architecture the suite builds, with prompts of different lengths in a batch and padding on
either side; where a model cannot take it, the pass falls back and says so."""

import numpy as np
import pytest
import torch

from gradsel.gradients import (
    PLAIN,
    Packing,
    ProblemRollouts,
    exact_parameters,
    exact_problem_gradient,
    group_advantages,
    head_features,
    make_spec,
    pack_batches,
    projected_features,
    shared_prompt_attention,
    shared_prompt_support,
    validation_gradient,
)
from gradsel.inputs.models import load_causal_lm
from toy_models import LOSS_AGG, tiny_config, tiny_moe, toy_groups

LEFT = Packing(padding_side="left")
RIGHT = Packing()


def assert_same(plain, shared, rtol=1e-4):
    """Equal up to float32 rounding, relative to the largest entry."""
    scale = max(float(np.abs(plain).max()), 1e-30)
    np.testing.assert_allclose(shared, plain, rtol=rtol, atol=rtol * scale)


def dense(arch):
    from transformers import AutoModelForCausalLM

    if arch == "tiny-arith":
        return load_causal_lm("tiny-arith")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


ARCHS = ["tiny-arith", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"]


def build(arch):
    return dense(arch) if arch in ("tiny-arith", "qwen2", "qwen3", "mistral") else tiny_moe(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_vectors_equal_one_sequence_per_rollout(arch):
    """Projected vectors (every Linear, router and expert stack) and the exact in-pass alignment."""
    model = build(arch)
    assert shared_prompt_support(model) is None  # the shared pass really runs, not the fallback
    # sliding-window models keep the dense masks (the block attention applies no window)
    assert shared_prompt_attention(model) == ("mask" if arch in ("mistral", "gpt_oss") else "blocks")
    vocab = model.get_input_embeddings().weight.shape[0]
    groups = toy_groups(seed=2, n_problems=5, vocab=min(vocab, 32))  # prompts of 3-6 tokens, one zero-advantage
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=1, dtype="float32")
    val_grad = validation_gradient(model, groups[3:], spec.modules, loss_agg=LOSS_AGG, pad_id=0, packing=PLAIN)
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=48, val_grad=val_grad)
    plain, plain_dots = projected_features(model, groups, spec, packing=PLAIN, **kw)
    assert np.count_nonzero(plain.any(axis=1)) == 4
    for packing in (RIGHT, LEFT):
        shared, dots = projected_features(model, groups, spec, packing=packing, **kw)
        assert_same(plain, shared)
        np.testing.assert_allclose(dots, plain_dots, rtol=1e-4, atol=1e-6 * np.abs(plain_dots).max())


@pytest.mark.parametrize("arch", ["tiny-arith", "mixtral"])
@pytest.mark.parametrize("packing", [RIGHT, LEFT], ids=["right", "left"])
def test_shared_prompt_exact_gradients_equal_one_sequence_per_rollout(arch, packing):
    """Full parameter gradients (--feature exact) and the validation gradient of --alignment."""
    model = build(arch)
    groups = toy_groups(seed=6, n_problems=4, vocab=min(model.get_input_embeddings().weight.shape[0], 32))
    params = exact_parameters(model, [n for n, _ in model.named_parameters()])
    for g in groups:
        plain = exact_problem_gradient(model, g, params, loss_agg=LOSS_AGG, pad_id=0, packing=PLAIN)
        shared = exact_problem_gradient(model, g, params, loss_agg=LOSS_AGG, pad_id=0, packing=packing)
        assert_same(plain.numpy(), shared.numpy())
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=30)
    for a, b in zip(
        validation_gradient(model, groups, spec.modules, packing=PLAIN, **kw),
        validation_gradient(model, groups, spec.modules, packing=packing, **kw),
    ):
        assert_same(a.numpy(), b.numpy())


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_shared_prompt_head_feature_equals_one_sequence_per_rollout(loss_agg):
    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=1)
    spec = make_spec(model, feature="head", modules=None, sketch=(8, 8), seed=0, dtype="float32")
    plain = head_features(model, groups, spec, loss_agg=loss_agg, pad_id=0, packing=PLAIN)
    for packing in (RIGHT, LEFT):
        assert_same(
            plain, head_features(model, groups, spec, loss_agg=loss_agg, pad_id=0, max_tokens=40, packing=packing)
        )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_block_attention_equals_the_dense_mask(padding_side):
    """The block attention (gradients.attention) against sdpa over the dense 4D masks, on one
    batch of rows with prompts of different lengths, a 1-token prompt (nothing to share: the
    row is its responses alone), responses of different lengths and padding on either side:
    the same logits and the same input-embedding gradients at every real position."""
    from gradsel.gradients.loss import batch_tensors

    model = load_causal_lm("tiny-arith")
    assert shared_prompt_attention(model) == "blocks"
    groups = toy_groups(seed=5, n_problems=4, k=4, zero_at=())
    groups[0].prompt_ids = [[7]] * 4
    rows = [r for batch in pack_batches(groups, LOSS_AGG, 1 << 20, share_prompts=True) for r in batch]
    assert len(rows) == 4 and any(not r.shared for r in rows)
    batch = batch_tensors(rows, 0, "cpu", padding_side)
    assert (batch.slots < 0).any()  # padded

    def run(attention):
        embeddings = model.get_input_embeddings()
        captured = {}
        # the embeddings as a leaf, so their gradient is kept
        handle = embeddings.register_forward_hook(
            lambda m, a, out: captured.setdefault("e", out.detach().requires_grad_())
        )
        try:
            logits = batch.forward(model, attention).logits
        finally:
            handle.remove()
        real = batch.slots >= 0
        (logits[real] * batch.weights[real].unsqueeze(-1)).sum().backward()
        return logits[real].detach(), captured["e"].grad[real]

    (blocks, blocks_grad), (dense, dense_grad) = run("blocks"), run("mask")
    assert_same(dense.numpy(), blocks.numpy())
    assert_same(dense_grad.numpy(), blocks_grad.numpy())


def test_a_problem_costs_its_prompt_once():
    """P - 1 + k (R + 1) tokens: the prompt once, its last token once per response; a problem
    whose rollouts saw two prompts gets a row per prompt; a row longer than the budget is split
    into rows of near-equal response counts, each with its own copy of the prompt."""
    prompt, other = list(range(10, 40)), list(range(40, 50))
    responses = [[5] * (3 + i) for i in range(8)]
    g = ProblemRollouts("p", [prompt] * 6 + [other] * 2, responses, [1.0, 0.0] * 4)
    g.advantages = group_advantages(g.rewards)
    rows = [r for batch in pack_batches([g], LOSS_AGG, 1 << 20, share_prompts=True) for r in batch]
    by_prompt = {tuple(r.shared): r for r in rows}
    assert len(rows) == 2 and set(by_prompt) == {tuple(prompt[:-1]), tuple(other[:-1])}
    assert len(by_prompt[tuple(prompt[:-1])].ids) == 29 + sum(len(r) + 1 for r in responses[:6])
    plain = sum(len(s.ids) for batch in pack_batches([g], LOSS_AGG, 1 << 20) for s in batch)
    assert plain == sum(len(p) + len(r) for p, r in zip(g.prompt_ids, g.response_ids))
    split = [r for batch in pack_batches([g], LOSS_AGG, 60, share_prompts=True) for r in batch]
    # the first prompt's 6 responses: 29 + 39 tokens together, 44 and 53 in two rows of 3
    assert sorted(len(r.tails) for r in split) == [2, 3, 3]
    assert all(len(r.ids) <= 60 for r in split)


def test_identical_responses_merge_and_cancel_exactly():
    """A problem whose k responses are one answer has a zero gradient whatever its rewards: the
    packing merges the copies, their weights cancel, and its vector is exactly zero, shared or not
    (before, one sequence per rollout left float32 noise whose cosine `select` ranked)."""
    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=3, n_problems=3)
    same = groups[1]
    same.response_ids = [list(same.response_ids[0]) for _ in same.response_ids]
    same.rewards = [1.0, 0.0, 0.0, 0.0]
    same.advantages = group_advantages(same.rewards)
    assert not same.zero_advantage
    assert not [r for batch in pack_batches([same], LOSS_AGG, 1 << 20, share_prompts=True) for r in batch]
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=40)
    shared, plain = (projected_features(model, groups, spec, packing=p, **kw) for p in (RIGHT, PLAIN))
    assert not shared[1].any() and not plain[1].any()  # one sequence per rollout merges them too
    assert_same(plain, shared)


def test_a_model_that_cannot_share_its_prompt_falls_back_and_says_so(capsys):
    """MPT's ALiBi ignores position ids: over a shared prompt a response would see other positions.
    The probe finds that, the pass runs each rollout whole, the vectors are today's, and the
    warning comes once."""
    import transformers
    from transformers import AutoModelForCausalLM

    from gradsel.gradients.loss import packing_for

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        transformers.MptConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4)
    ).eval()
    groups = toy_groups(seed=2, n_problems=4, vocab=32)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=48)
    default = projected_features(model, groups, spec, **kw)
    again = projected_features(model, groups, spec, **kw)
    assert "does not give a response the same logits" in shared_prompt_support(model)
    assert packing_for(model, Packing()) == PLAIN
    np.testing.assert_array_equal(default, projected_features(model, groups, spec, packing=PLAIN, **kw))
    np.testing.assert_array_equal(default, again)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "prompts are not shared" in err


def _score_cli(tmp_path, model, *extra):
    from gradsel.demo.tasks import write_regime
    from helpers import run_cli

    data = tmp_path / "data"
    if not data.exists():
        write_regime(data, "clean", size=16, val_size=6, seed=3)
    store = tmp_path / ("store" + "".join(extra))
    proc = run_cli(
        "score",
        "--model",
        str(model),
        "--pool",
        str(data / "pool.parquet"),
        "--val",
        str(data / "val.parquet"),
        "--store",
        str(store),
        "--engine",
        "hf",
        "--max-tokens",
        "6",
        "--n",
        "4",
        "--reward",
        "random",
        *extra,
    )
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((store / "manifest.json").read_text())
    return proc, manifest, pq.read_table(store / manifest["features"] / "scores.parquet")


def test_score_shares_prompts_by_default_and_records_it(tmp_path):
    """`gradsel score` shares prompts on tiny-arith, says so in the manifest, and its scores are
    those of --no-share-prompts (up to float32 rounding)."""
    _, shared_manifest, shared = _score_cli(tmp_path, "tiny-arith")
    _, plain_manifest, plain = _score_cli(tmp_path, "tiny-arith", "--no-share-prompts")
    assert shared_manifest["prompt_sharing"] == {"used": True, "reason": None, "attention": "blocks"}
    assert plain_manifest["prompt_sharing"] == {"used": False, "reason": "--no-share-prompts", "attention": None}
    assert shared_manifest["features"] == plain_manifest["features"]  # the same feature space
    assert shared.column("problem_id").to_pylist() == plain.column("problem_id").to_pylist()
    norms, plain_norms = shared.column("grad_norm").to_numpy(), plain.column("grad_norm").to_numpy()
    np.testing.assert_allclose(norms, plain_norms, rtol=1e-4, atol=1e-5 * plain_norms.max())
    # tiny-arith often writes one answer k times: with random rewards the gradient is then exactly
    # zero both ways (the copies merge); elsewhere a norm near zero makes its cosine meaningless
    live = plain_norms > 1e-5 * plain_norms.max()
    assert live.sum() >= 10
    np.testing.assert_allclose(
        shared.column("score_cos").to_numpy()[live], plain.column("score_cos").to_numpy()[live], rtol=1e-3, atol=1e-5
    )


def test_score_on_a_model_that_cannot_share_warns_once_and_records_why(tmp_path):
    import transformers

    from gradsel.inputs.models import load_tokenizer

    tok = load_tokenizer("tiny-arith")
    torch.manual_seed(0)
    config = transformers.MptConfig(
        vocab_size=len(tok),
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mpt")
    tok.save_pretrained(tmp_path / "mpt")
    proc, manifest, _ = _score_cli(tmp_path, tmp_path / "mpt")
    # Said once a run (the coin-flip reward of this pool may add its own judge-contract warning).
    assert proc.stderr.count("warning: prompts are not shared") == 1
    assert manifest["prompt_sharing"]["used"] is False
    assert "does not give a response the same logits" in manifest["prompt_sharing"]["reason"]
