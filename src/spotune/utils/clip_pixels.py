"""CLIP's pixel normalisation (OpenAI CLIP's per-channel mean and std): one definition for the judges, their
loaders and the evaluation's scorers (a leaf module)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIP_MEAN", "CLIP_STD"]
