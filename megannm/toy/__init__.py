"""The embedded default: a world of coloured shapes with captions that a checker can verify, its chat data, its
verifiable rewards and prompt generators, its benchmarks and ``megannm demo``; and, beyond one shape, scenes of one
to four shapes (``scenes.py``) with a compositional benchmark in GenEval's categories (``geneval.py``).

The core never imports this package: the toy registers its rewards, prompt generators and benchmarks as entry
points (``setup.py``), exactly as a user's own package would, and the core finds them by name.
"""
