"""Analyses: direct logit attribution, the logit lens, head detectors, circuit knockouts."""

from mechscope.analysis.circuit import faithfulness
from mechscope.analysis.dla import direct_logit_attribution, logit_lens
from mechscope.analysis.heads import head_scores

__all__ = ["direct_logit_attribution", "faithfulness", "head_scores", "logit_lens"]
