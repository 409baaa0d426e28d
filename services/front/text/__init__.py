"""The front tier's text work: chat templates (templates.py), tokenization and its limits
(tokenizer.py), incremental decoding and stop strings (detokenizer.py). Nothing here knows of the
GPU tier: token ids are the boundary.
"""
