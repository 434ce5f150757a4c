"""Metrics: generation quality (inception.py: the Inception network and its features; fid.py: FID, KID, IS,
precision/recall; reference.py: cached reference features), reconstruction quality and semantic quality of
tokenizers. See docs/metrics.md."""
