"""Flax ports of Llama, Mistral and OPT sharing one decoder."""
