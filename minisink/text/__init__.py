"""Text in and out of a stream: the tokenizers (tokenizer) and chat templates (chat)."""
