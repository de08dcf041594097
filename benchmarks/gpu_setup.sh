#!/usr/bin/env bash
# Set-up on the lent GPU machine (no package index there): install the carried wheels (.whl/, see
# README "GPU machine") into /tmp/site and the project itself, editable, without dependencies.
# Usage on that machine, from the repository root:  source benchmarks/gpu_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
set +e
