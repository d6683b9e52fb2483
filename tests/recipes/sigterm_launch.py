"""``spotune`` as ``accelerate launch`` runs it, with a scheduler's SIGTERM sent to one process only.

    accelerate launch ... tests/recipes/sigterm_launch.py RANK ITERATION train --config ... key=value ...

Process RANK signals itself as it starts sampling iteration ITERATION + 1 (ITERATION iterations done); the
other processes get no signal and must stop at the same iteration all the same.
"""

from __future__ import annotations

import os
import signal
import sys

from spotune.cli import main
from spotune.recipes.train_spo import SPOTrainer

if __name__ == "__main__":
    rank, iteration, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    original = SPOTrainer.sample

    def sample(self, prompts, tree_row=None):
        if self.accelerator.process_index == rank and self.iteration == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, prompts, tree_row=tree_row)

    SPOTrainer.sample = sample
    sys.exit(main(argv))
