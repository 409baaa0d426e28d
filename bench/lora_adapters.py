"""Small LoRA adapters for the default model, made on the fly with peft (nothing downloaded or
committed) for the LoRA tests and `python -m bench lora`: rank `rank` on q_proj and v_proj, random
non-zero A and B from a seed (peft starts B at zero, a no-op), scaled so that greedy output differs
from the base model's but stays text. A different seed gives a different adapter.

    python -m bench.lora_adapters OUT_DIR [--seed N] [--rank R]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_adapter(base_model: str, out: Path, *, seed: int = 0, rank: int = 8, scale: float = 0.1,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """Write a peft LoRA adapter for `base_model` (a local folder) to `out`; return `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(base_model)
    # random weights of the base's shape: only the adapter's shapes and names matter here
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    # the base model's own path, as a fine-tune would record it (vLLM does not read it)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", default=None, help="base model folder (default: the default model in the store)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    base = args.base or default_model_folder()
    print(make_adapter(base, args.out, seed=args.seed, rank=args.rank))


def default_model_folder() -> str:
    import bentoml

    from services.config import DEFAULT_MODEL

    return bentoml.models.get(f"{DEFAULT_MODEL}:latest").path


if __name__ == "__main__":
    main()
