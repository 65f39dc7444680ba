"""Data: the toy shapes world, image and text tokenizers, tokenisation into shards, and the loader."""
