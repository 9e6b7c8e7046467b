"""Host-side trainer: experts, router, GGUF export and quantization, packages."""
