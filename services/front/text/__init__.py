"""The front tier's text work: chat templates, tokenization and limits, incremental decoding."""
