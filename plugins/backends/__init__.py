"""Backends: where model calls go (llamacpp:, openai:/vllm:, litellm:)."""
