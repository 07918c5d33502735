"""Exports for runtimes outside transformers: GGUF (llama.cpp, Ollama, LM Studio) in `gguf.py`.

The merged transformers folder (`deltatune merge`) lives in pipeline/export.py; this package writes the other
formats from the same merged model, and checks each file it writes against the model it came from.
"""
