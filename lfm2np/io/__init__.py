"""Reading and writing files: safetensors, GGUF, tokenizers, the local Hugging Face cache."""
