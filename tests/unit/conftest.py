"""Unit tests (no server, no engine): front/ and gpu/ mirror services/front and services/gpu; the
tests here cover what both tiers share (the contract, the settings, the LoRA modules, the
harness). This folder is on sys.path for every test under it, so `fake_gpu_tier` (the stand-in
GPU tier that front tests serve) imports from any of them."""
