"""Model paths: the bundled `tiny-arith` alias, local directories, and loading with transformers.

gradsel never downloads weights: a model is a local directory in Hugging Face format.
"""

from __future__ import annotations

from pathlib import Path

from gradsel.core.errors import GradselError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ALIASES = {"tiny-arith": ASSETS / "tiny-arith"}


def resolve_model_path(model: str | Path) -> Path:
    """Return the directory behind a model alias or path, or raise a user error."""
    path = ALIASES.get(str(model), Path(model)).expanduser()
    if not path.is_dir():
        raise GradselError(
            f"model {str(model)!r} is not a directory",
            "pass a local Hugging Face model directory or the alias 'tiny-arith' (gradsel never downloads from a hub)",
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise GradselError(
            f"model directory {path} has no config.json",
            "point --model at the directory that holds config.json and the weights",
        )
    return path.resolve()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def adapter_base(path: Path) -> str | None:
    """A PEFT adapter directory's base model (`base_model_name_or_path`); None for a plain checkpoint."""
    import json

    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path") or None


def tokenizer_path(model: str | Path) -> Path:
    """Where the model's tokenizer lives: its own directory, or for a PEFT adapter saved without
    one (PEFT does not save it) its base model's."""
    path = resolve_model_path(model)
    base = adapter_base(path)
    if base is None or any((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    return tokenizer_path(base)


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    path = tokenizer_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise GradselError(
            f"cannot load a tokenizer from {path}: {exc}".splitlines()[0],
            "the model directory needs tokenizer files (tokenizer.json or similar)",
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM in eval mode; a PEFT adapter directory is merged onto its base model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # gradsel draws its own progress on stderr

    path = resolve_model_path(model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        if (path / "adapter_config.json").is_file():
            lm = load_peft_merged(path, torch_dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise GradselError(
            f"cannot load model weights from {path}: {exc}".splitlines()[0],
            "check that the directory holds a complete transformers checkpoint",
        ) from exc
    return lm.to(device).eval()


def save_merged(adapter_dir: Path, dest: Path) -> Path:
    """A LoRA adapter merged onto its base model, saved as an ordinary checkpoint (atomically)."""
    import os
    import shutil

    import torch

    if (dest / "config.json").is_file():
        return dest
    merged = load_peft_merged(resolve_model_path(adapter_dir), torch.float32)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(adapter_dir).save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def load_peft_merged(adapter_dir: Path, torch_dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # gradsel draws its own progress on stderr
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise GradselError("loading a LoRA adapter needs the 'peft' package", "pip install peft") from exc
    base = adapter_base(adapter_dir)
    if base is None:
        raise GradselError(
            f"{adapter_dir / 'adapter_config.json'} names no base_model_name_or_path",
            "set it to the local directory of the base model",
        )
    base_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch_dtype)
    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def vocabulary_digest(model: str | Path) -> str:
    """A digest of the token -> id map: stored token ids mean the same tokens under two
    checkpoints exactly when their digests agree."""
    import hashlib
    import json

    tok = load_tokenizer(model)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return "sha256:" + hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def context_length(model: str | Path) -> int | None:
    """The longest sequence the model takes (config.max_position_embeddings), or None when the
    config does not say (a PEFT adapter is read through its base model's config)."""
    import json

    path = resolve_model_path(model)
    config_path = path / "config.json"
    if not config_path.is_file():  # a PEFT adapter: its base model's config
        base = adapter_base(path)
        return context_length(base) if base else None
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's under text_config
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if isinstance(value, int) and value > 0 else None
