"""Analyses of one run: direct logit attribution, the logit lens, head detectors."""

from mechscope.analysis.dla import direct_logit_attribution, logit_lens
from mechscope.analysis.heads import head_scores

__all__ = ["direct_logit_attribution", "head_scores", "logit_lens"]
