"""sweepbp: sweep the compute-versus-memory trade-off of LoRA backpropagation."""

__version__ = "0.1.0"
