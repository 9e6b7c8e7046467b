"""The engine: a loaded base and its adapters (session), what is loaded when (scheduler), memory fit, host CPU."""
