#!/usr/bin/env bash
# One trainer's environment for tests/test_handoff_verl.py (`make trainer-envs`, docs/trainers.md):
#     scripts/trainer_env.sh BASE_PYTHON DIR PACKAGE...
# A venv at DIR, made from BASE_PYTHON (so the same Python), that sees BASE_PYTHON's packages
# through a .pth file and has PACKAGE... installed on top with --no-deps: the trainer's readers run
# against gradsel's torch/transformers without the trainer's full dependency tree (Ray, vLLM pins).
# On success: DIR/.installed. On failure (no registry, a package gone): DIR is removed, the reason is
# written to DIR.install-failed (the tests skip with it) and the script still exits 0, so that a
# missing trainer never fails `make test`.
set -uo pipefail
base_python=$1 dir=$2
shift 2
failed="$dir.install-failed"
log="$dir.log"
rm -rf "$dir" "$failed"
mkdir -p "$(dirname "$dir")"

purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
if "$base_python" -m venv --without-pip "$dir" >"$log" 2>&1 \
  && base_site=$("$base_python" -c "$purelib") \
  && env_site=$("$dir/bin/python" -c "$purelib") \
  && echo "$base_site" >"$env_site/gradsel-venv.pth" \
  && "$base_python" -m pip --python "$dir/bin/python" install --quiet --no-deps "$@" >>"$log" 2>&1; then
  touch "$dir/.installed"
  rm -f "$log"
  exit 0
fi
reason="installing $* into $dir failed: $(grep -m1 '^ERROR' "$log" || tail -n1 "$log")"
echo "$reason" >"$failed"
rm -rf "$dir"
echo "warning: $reason (full log: $log); tests/test_handoff_verl.py will skip its check with this reason" >&2
exit 0
