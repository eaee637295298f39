import json
import os
import shutil

import pytest

from gradsel.core.errors import GradselError
from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import load_causal_lm, resolve_model_path
from gradsel.inputs.snapshot import content_hash, take_snapshot
from helpers import QUICK_SCORE, assert_user_error, run_cli


@pytest.fixture
def model_copy(tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(resolve_model_path("tiny-arith"), dest)
    return dest


def test_hash_modes_detect_weight_changes(model_copy):
    full, files = content_hash(model_copy, mode="sha256")
    fast, _ = content_hash(model_copy, mode="fast")
    assert full.startswith("sha256:") and fast.startswith("fast:")
    assert any(f["name"] == "model.safetensors" for f in files)
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte lies in the last MiB, which the fast mode reads
    weights.write_bytes(bytes(data))
    assert content_hash(model_copy, mode="sha256")[0] != full
    assert content_hash(model_copy, mode="fast")[0] != fast


def test_copy_freezes_the_checkpoint(model_copy, tmp_path):
    snap = take_snapshot(model_copy, copy_into=tmp_path / "store/checkpoints")
    frozen = tmp_path / "store/checkpoints" / snap.content_hash.split(":")[1][:16]
    assert snap.path == str(frozen) and snap.source_path == str(model_copy.resolve())
    assert (frozen / "model.safetensors").stat().st_ino == (model_copy / "model.safetensors").stat().st_ino
    # A trainer that replaces its output file (write new, rename over) leaves the frozen copy intact.
    new = model_copy / "model.safetensors.new"
    new.write_bytes(b"overwritten")
    os.replace(new, model_copy / "model.safetensors")
    assert content_hash(frozen)[0] == snap.content_hash
    assert snap.config["architectures"] == ["LlamaForCausalLM"]


def test_snapshot_cli_and_missing_weights(tmp_path):
    proc = run_cli("snapshot", "--model", "tiny-arith", "--store", str(tmp_path / "s"), "--hash", "fast")
    out = json.loads(proc.stdout)
    assert out["content_hash"].startswith("fast:")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(GradselError, match="no weight files"):
        take_snapshot(empty)


def test_lora_adapter_on_its_base(tmp_path, model_copy):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_copy)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model_copy)
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(cfg))
    snap = take_snapshot(tmp_path / "adapter", copy_into=tmp_path / "frozen")
    assert snap.base is not None and snap.base.content_hash == content_hash(model_copy)[0]
    merged = load_causal_lm(snap.path)
    plain = load_causal_lm(model_copy)
    assert type(merged) is type(plain)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not q_merged.equal(plain.model.layers[0].self_attn.q_proj.weight)


@pytest.fixture
def lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from gradsel.inputs.models import resolve_model_path

    base_dir = resolve_model_path("tiny-arith")
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    lora.save_pretrained(tmp_path / "adapter")  # PEFT saves no tokenizer
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(cfg))
    assert not (tmp_path / "adapter/tokenizer.json").exists()
    return tmp_path / "adapter"


def test_a_lora_adapter_scores_with_its_base_tokenizer_merged_once(lora_adapter, tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=10, val_size=16, seed=2)
    store = tmp_path / "store"
    run_cli(
        "score",
        "--model",
        str(lora_adapter),
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        *QUICK_SCORE,
    )
    merged = list((store / "merged").iterdir())
    assert len(merged) == 1 and (merged[0] / "tokenizer.json").is_file() and (merged[0] / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_lora_adapter_rolls_out_through_vllm(lora_adapter, tmp_path):
    pool, val = write_regime(tmp_path / "data", "clean", size=10, val_size=16, seed=2)
    summary = json.loads(
        run_cli(
            "score",
            "--model",
            str(lora_adapter),
            "--pool",
            str(pool),
            "--val",
            str(val),
            "--store",
            str(tmp_path / "store"),
            "--engine",
            "vllm",
            "--max-tokens",
            "6",
            "--n",
            "4",
        ).stdout
    )
    assert summary["candidates"] == 10


def test_a_truncated_safetensors_file_is_a_user_error(tmp_path):
    from gradsel.inputs.models import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-arith"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    pool, val = write_regime(tmp_path / "data", "clean", size=4, val_size=4, seed=2)
    proc = run_cli(
        "score",
        "--model",
        str(model),
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "store"),
        *QUICK_SCORE,
        check=False,
    )
    assert_user_error(proc, "is incomplete or damaged")
