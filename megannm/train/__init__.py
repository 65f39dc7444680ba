"""Training: the DeepSpeed engine built from a recipe (``engine``), the Trainer that owns every step (``loop``), the
Phase interface it runs (``phase``) and its statistics (``stats``), the pipeline path (``pipeline``), a live
engine's checkpoints (``checkpoint``: save, prune, resume) and starting weights (``load``: ``init_from``), logs and
preemption signals."""
