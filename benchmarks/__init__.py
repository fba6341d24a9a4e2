"""Speed benchmarks for the Qwen3-VL SFT job (see README.md here). Run from the repository root."""
