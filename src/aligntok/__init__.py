"""AlignTok: aligning visual foundation encoders to tokenizers for diffusion models."""

__version__ = "0.1.0"
