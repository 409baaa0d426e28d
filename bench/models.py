"""The model folders of the GPU phases: the default model's config and tokenizer (no weights) with
the layer sizes of a shape, served with `--load-format dummy` (random weights: the speed of that
shape, no download). `smol` is SmolLM2-135M itself; `llama7b` has Llama-2-7B's sizes, `llama1b`
TinyLlama-1.1B's.

    make_model(source, Path("/tmp/models/llama7b"), "llama7b")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHAPES = {  # head counts divisible by 2, 4 and 8
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, max_position_embeddings=16384, tie_word_embeddings=False,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),  # TinyLlama-1.1B's sizes
    "smol": {},
}


def default_source() -> Path:
    """The pipeline's configured model folder (the default one in the BentoML store)."""
    from services.config import settings

    return Path(settings.model_path)


def make_model(src: Path, dest: Path, shape: str) -> Path:
    """`src`'s files but its weights, into `dest`, its config given `shape`'s sizes; returns `dest`."""
    if not (src / "config.json").exists():
        raise SystemExit(f"{src} has no config.json: give a model folder (config and tokenizer files)")
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(path, dest / path.name)
    config = json.loads((src / "config.json").read_text())
    config.update(SHAPES[shape])
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest
