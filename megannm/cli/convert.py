"""``megannm convert``: checkpoints between the DeepSpeed, consolidated and Hugging Face forms.

Its parser still lives in ``megannm.convert.cli`` (the checkpoint room's, being reworked in parallel); this module is
where the command is found, so that the parser can move here without the dispatch changing."""
from __future__ import annotations


def convert(argv: list[str]) -> int:
    from megannm.convert.cli import main
    return main(argv)
