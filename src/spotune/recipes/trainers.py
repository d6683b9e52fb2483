"""Which trainer a train config runs, and running it: the one place above SPO's, GradSPO's and LPO's trainers.

``train_gradspo`` and ``train_lpo`` subclass ``train_spo``'s trainer, so the choice lives here rather than in ``train_spo``
(which would import its own subclass back). ``spotune train``, the demo and ``spotune plan`` all choose
through :func:`trainer_class`.
"""

from __future__ import annotations

from spotune.recipes.common import run_recipe
from spotune.recipes.train_gradspo import GradSPOTrainer
from spotune.recipes.train_lpo import LPOTrainer
from spotune.recipes.train_spo import SPOTrainer
from spotune.recipes.train_spo_config import TrainSPOConfig


def trainer_class(config: TrainSPOConfig) -> type[SPOTrainer]:
    """The trainer ``config.algorithm`` names: :class:`SPOTrainer` (spo), :class:`GradSPOTrainer` (gradspo) or
    :class:`LPOTrainer` (lpo)."""
    return {"gradspo": GradSPOTrainer, "lpo": LPOTrainer}.get(config.algorithm, SPOTrainer)


def run_train_spo(config: TrainSPOConfig) -> dict[str, float]:
    """Set up, train and clean up; returns the final iteration's metrics."""
    return run_recipe(trainer_class(config)(config))


__all__ = ["run_train_spo", "trainer_class"]
