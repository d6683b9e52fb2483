"""The fine-tuning methods ``spotune demo`` and the multi-seed study compare (a leaf module: the demo, its report
and the study read it, and it imports none of them)."""

from __future__ import annotations

from typing import Any

# The fine-tuning methods the demo can compare: name -> (model name in the report, train overrides).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "spo": ("SPO", {}),
    "trajectory": ("trajectory DPO", {"pairing": "trajectory"}),
    "gradspo": ("GradSPO", {"algorithm": "gradspo"}),
    # LPO judges the noisy candidates with the shipped latent reward model (resources/toyworld/lrm), from the first
    # step, against the authors' SD1.5 thresholds (0.35 at the least noisy step to 0.5 at the noisiest).
    "lpo": ("LPO", {"algorithm": "lpo", "judge": "lrm", "divert_start_step": 0,
                    "lpo_threshold_min": 0.35, "lpo_threshold_max": 0.5}),
}
# Train keys that only GradSPO (LPO) reads: left out of the other stages' keys, so their caches stay valid.
GRADSPO_KEYS = ("algorithm", "ema_decay", "grad_scale")
LPO_KEYS = ("lpo_threshold_min", "lpo_threshold_max", "lrm_timestep")
