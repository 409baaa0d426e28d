"""Where the model comes from: the BentoML model store, the Hugging Face Hub, or a local folder.

Both service classes declare `model_reference(settings.model)` as a class attribute, so that
`bentoml build` packs the model into the Bento and each tier finds it there at run time.
"""

from __future__ import annotations

from pathlib import Path

from bentoml.models import BentoModel, HuggingFaceModel


def model_reference(model: str) -> BentoModel | HuggingFaceModel | None:
    """The BentoML model reference for a setting, or None for a local folder (not packed)."""
    if Path(model).is_dir():
        return None
    if "/" in model:
        return HuggingFaceModel(model)
    return BentoModel(model)


def resolve_model_path(model: str) -> str:
    """A local folder holding the model's config, tokenizer and weights."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    reference = model_reference(model)
    if isinstance(reference, BentoModel) and reference.stored is None:
        raise RuntimeError(
            f"model {model!r} is not in the BentoML model store: run `python scripts/prepare_model.py` "
            f"for the default model, or set PIPELINE_MODEL to a Hugging Face id or a local folder"
        )
    resolved = reference.resolve()
    return resolved if isinstance(resolved, str) else resolved.path


# The sampling fields `vllm serve` takes from a model's generation_config.json as request defaults
# (ModelConfig.get_diff_sampling_param, `--generation-config auto`).
GENERATION_SAMPLING_DEFAULTS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


def sampling_defaults(model_path: str) -> dict[str, float | int]:
    """The model's own sampling defaults: the fields above that its generation_config.json sets to
    something other than transformers' defaults, as vLLM reads them. Empty without the file."""
    from transformers import GenerationConfig

    try:
        values = GenerationConfig.from_pretrained(model_path).to_diff_dict()
    except OSError:  # no generation_config.json
        return {}
    return {name: values[name] for name in GENERATION_SAMPLING_DEFAULTS if values.get(name) is not None}


def adapter_reference(path: str) -> BentoModel | None:
    """The model-store reference of a LoRA adapter given by its store tag (packed by `bentoml
    build`), or None for a folder or a Hugging Face id (vLLM reads those itself)."""
    if Path(path).is_dir() or "/" in path or path.startswith("."):
        return None
    return BentoModel(path)
