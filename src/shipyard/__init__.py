"""shipyard: from a LoRA-finetuned, quantized chat model on disk to a production vLLM service."""

__version__ = "0.1.0"

__all__ = ["__version__"]
