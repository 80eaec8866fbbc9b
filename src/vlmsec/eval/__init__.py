"""Evaluation metrics: ASR, false-trigger rate, ASR-G, CIDEr, BLEU-4."""

from vlmsec.eval.metrics import asr_g, caption_scores, contains_target, target_rate

__all__ = ["asr_g", "caption_scores", "contains_target", "target_rate"]
