"""Which trainer a train config runs, and running it: the one place above both SPO's and GradSPO's trainers.

``train_gradspo`` subclasses ``train_spo``'s trainer, so the choice lives here rather than in ``train_spo``
(which would import its own subclass back). ``spotune train``, the demo and ``spotune plan`` all choose
through :func:`trainer_class`.
"""

from __future__ import annotations

from spotune.recipes.common import run_recipe
from spotune.recipes.train_gradspo import GradSPOTrainer
from spotune.recipes.train_spo import SPOTrainer
from spotune.recipes.train_spo_config import TrainSPOConfig


def trainer_class(config: TrainSPOConfig) -> type[SPOTrainer]:
    """The trainer ``config.algorithm`` names: :class:`SPOTrainer` (spo) or :class:`GradSPOTrainer` (gradspo)."""
    return GradSPOTrainer if config.algorithm == "gradspo" else SPOTrainer


def run_train_spo(config: TrainSPOConfig) -> dict[str, float]:
    """Set up, train and clean up; returns the final iteration's metrics."""
    return run_recipe(trainer_class(config)(config))


__all__ = ["run_train_spo", "trainer_class"]
