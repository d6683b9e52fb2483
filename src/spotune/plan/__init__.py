"""``spotune plan``: a recipe's GPU memory and time, predicted on a CPU from one iteration run on fake tensors.

:mod:`~spotune.plan.recorder` counts storages, FLOPs and bytes per op; :mod:`~spotune.plan.cuda_autocast`
gives CPU autocast CUDA's precision rules; :mod:`~spotune.plan.architectures` builds the models from
configs; :mod:`~spotune.plan.predict` runs the recipe's own setup and one iteration; :mod:`~spotune.plan.gpus`
holds the cards' data-sheet figures and the roofline; :mod:`~spotune.plan.report` decides fits / does not
fit, searches the memory knobs and writes the table and the JSON.
"""
