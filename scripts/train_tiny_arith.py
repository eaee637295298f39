"""Train the bundled ``tiny-arith`` model from a seed, deterministically, on a CPU.

    .venv/bin/python scripts/train_tiny_arith.py --out gradsel/assets/tiny-arith

A Llama-architecture causal LM (about 1.8M parameters) with a character-level tokenizer saved
in Hugging Face format. It is trained on a mix of the task's domains and saved half way through
its learning-rate schedule, on purpose: sampled at temperature 1.0 it solves some problems but
not all, which is what GRPO needs (every group all-right or all-wrong has zero advantage), and
its learning rate is not yet decayed, so fine-tuning on some problems still moves others (a
fully trained model has memorised its domains and transfers nothing, docs/research/quality.md). Answers are written most
significant digit first, as the task format demands, so carries must be computed as a
procedure over digit positions rather than looked up: the same circuit serves every problem
of a domain, and that is what makes gradients of different problems align.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from gradsel.demo.tasks import DOMAINS, answer_of, identity_problem, prompt_text

CHARS = list("0123456789+-*=")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
TRAIN_MIX = {"add1": 0.15, "add2": 0.35, "sub2": 0.25, "mul": 0.20, "identity": 0.05}


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 64
    return tok


def build_model(vocab_size: int, seed: int, d_model: int, layers: int, heads: int, ffn: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sample_problem(rng: random.Random) -> tuple[str, str]:
    name = rng.choices(list(TRAIN_MIX), weights=list(TRAIN_MIX.values()))[0]
    if name == "identity":
        a, op, b = identity_problem(rng)
    else:
        dom = DOMAINS[name]
        a, b = dom.sample(rng)
        op = dom.op
    return prompt_text(a, op, b), str(answer_of(a, op, b))


def make_batch(rng: random.Random, tok, batch_size: int, seq_len: int):
    """Right-padded (input_ids, labels); the loss covers answer tokens and EOS only."""
    ids = torch.full((batch_size, seq_len), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
    for row in range(batch_size):
        prompt, answer = sample_problem(rng)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p) : len(seq)] = torch.tensor(a)
    return ids, labels


@torch.no_grad()
def sampled_pass_rates(model, tok, n_problems: int, k: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    model.eval()
    out = {}
    for name, dom in DOMAINS.items():
        probs = [dom.sample(rng) for _ in range(n_problems)]
        prompts = [prompt_text(a, dom.op, b) for a, b in probs]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed)
        gen = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=k,
            max_new_tokens=6,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct = [
            texts[i * k + j].strip() == str(answer_of(a, dom.op, b)) for i, (a, b) in enumerate(probs) for j in range(k)
        ]
        out[name] = sum(correct) / len(correct)
    model.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gradsel/assets/tiny-arith"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument(
        "--stop-at",
        type=int,
        default=550,
        help="save after this many steps, with the learning rate --steps' schedule has then: a "
        "mid-training checkpoint, not yet decayed, on which learning some problems moves others "
        "(docs/tiny-arith.md); --stop-at 0 runs the whole schedule",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2, help="fixed so that runs are reproducible")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer()
    model = build_model(len(tok), args.seed, args.d_model, args.layers, args.heads, args.ffn)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / args.steps))
    rng = random.Random(args.seed)
    model.train()
    start = time.time()
    for step in range(1, (args.stop_at or args.steps) + 1):
        ids, labels = make_batch(rng, tok, args.batch_size, seq_len=12)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            rates = sampled_pass_rates(model, tok, n_problems=40, k=4, seed=1234)
            print("  pass@T=1:", json.dumps({k: round(v, 3) for k, v in rates.items()}), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_p = 1.0
    model.generation_config.top_k = 0
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    (args.out / "TRAINING.json").write_text(
        json.dumps(vars(args) | {"out": str(args.out), "parameters": n_params}, indent=2) + "\n"
    )
    print(f"saved to {args.out} after {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
