"""minisink: StreamingLLM (attention sinks + a rolling KV window) in readable PyTorch."""
__version__ = "0.1.0"
