"""Retrieval and search: a catalogue index, exact and approximate top-k search, seeking
products by text (retrieve, ground, re-rank), contact sheets, Product1M instance retrieval."""
