"""PIPELINE_CACHE_DIR: every compile cache of the engine under one folder, a value set outside kept."""

from __future__ import annotations

import os
from pathlib import Path

from services.config import Settings
from services.gpu import engine_args
from services.gpu.caches import CACHE_VARIABLES, cache_environment


def _unset_caches(monkeypatch) -> None:
    for name in CACHE_VARIABLES:  # set, then removed: monkeypatch puts back what was there (nothing)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_every_cache_goes_under_the_one_folder(tmp_path: Path):
    env = cache_environment(tmp_path / "cache")
    assert set(env) == {"VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
                        "CUDA_CACHE_PATH"}
    assert all(Path(value).parent == (tmp_path / "cache").resolve() for value in env.values())
    assert len(set(env.values())) == len(env)  # one sub-folder each


def test_the_engine_arguments_set_the_caches_unless_set_outside(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(engine_args, "is_cpu_build", lambda: False)
    _unset_caches(monkeypatch)
    engine_args.engine_args(Settings(model=str(tmp_path)))
    assert not any(name in os.environ for name in CACHE_VARIABLES)  # unset: the libraries' own defaults

    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere/triton")
    engine_args.engine_args(Settings(model=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert os.environ["VLLM_CACHE_ROOT"] == str((tmp_path / "cache" / "vllm").resolve())
    assert os.environ["CUDA_CACHE_PATH"] == str((tmp_path / "cache" / "nv").resolve())
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere/triton"
