"""Training loops: one for the tokenizer (all three stages), one for the flow-matching DiT."""
