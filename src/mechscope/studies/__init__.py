"""Studies: whole investigations that chain the techniques, e.g. the IOI circuit of Wang et al. 2022."""

from mechscope.studies.ioi import CLASSES, PAPER_GPT2, Settings, run_ioi

__all__ = ["CLASSES", "PAPER_GPT2", "Settings", "run_ioi"]
