"""Data: the embedded corpus (corpus.py) and token shards with a
packed, resumable loader (shards.py)."""
