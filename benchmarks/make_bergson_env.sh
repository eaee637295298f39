#!/usr/bin/env bash
# A separate environment with the peer, EleutherAI's bergson 2.5.1, for benchmarks/score.py arm (v).
# bergson is installed without its dependencies, then with its requirements except torchvision,
# torchaudio and bitsandbytes, which its `build` path never imports (and whose PyPI builds do not
# load beside the CPU torch); pip then reports them as missing, which is expected.
# Usage: bash benchmarks/make_bergson_env.sh [DIR]   (default .bench-envs/bergson)
set -euo pipefail
dir="${1:-.bench-envs/bergson}"
python3 -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet torch==2.13.0
"$dir/bin/python" -m pip install --quiet --no-deps bergson==2.5.1
"$dir/bin/python" -m pip install --quiet accelerate datasets jinja2 "jaxtyping>=0.3.3" ml_dtypes natsort numpy \
    scipy "peft>=0.17.0" petname pyarrow pyyaml simple-parsing torchopt "transformers>=5.0" "huggingface-hub>=1.13.0" pandas
echo "bergson environment ready: $dir/bin/python"
