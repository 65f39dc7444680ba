"""Several recipe runs in ONE launch (start-up costs ~8 s per launch on 2 cores): test_elastic.py's 2-rank part.

usage: python elastic_cases.py RUN [RUN ...]   (under torchrun)

RUN is ``RECIPE.yaml:EXIT:RESUME``: train the recipe until step EXIT (``schedule.exit_interval``; 0: to its end),
resuming from its ``latest`` when RESUME is 1.
"""
import sys

from megannm import parallel
from megannm.config import load_recipe
from megannm.stage import build_trainer

for run in sys.argv[1:]:
    path, exit_at, resume = run.rsplit(":", 2)
    layout = parallel.init_parallel(1, 1)
    r = load_recipe(path, [f"schedule.exit_interval={exit_at}"], world_size=layout.world_size)
    build_trainer(r, layout, source=path).run(resume=resume == "1")
