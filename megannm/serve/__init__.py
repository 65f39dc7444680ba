"""``megannm serve``: an OpenAI-compatible HTTP server over the batched decoder (``megannm.decode``)."""
