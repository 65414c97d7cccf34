"""Exporting checkpoints to other runtimes' formats: GGUF for llama.cpp (and ollama, LM Studio)."""

from nanoseek.export.gguf import ExportError, export_gguf

__all__ = ["ExportError", "export_gguf"]
