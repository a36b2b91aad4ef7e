"""Models: formats and configs, tokenizers, the float reference forward, sampling."""
