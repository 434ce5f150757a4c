"""Metrics: generation quality (fid.py: Inception features, FID, KID, IS, precision/recall, cached reference
statistics), reconstruction quality and semantic quality of tokenizers. See docs/metrics.md."""
