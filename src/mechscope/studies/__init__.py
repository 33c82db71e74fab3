"""Studies: whole investigations that chain the techniques: the IOI circuit of Wang et al. 2022, and
the positional hypothesis (word index rather than token position)."""

from mechscope.studies.ioi import CLASSES, PAPER_GPT2, Settings, run_ioi
from mechscope.studies.positions import PositionSettings, run_positions

__all__ = ["CLASSES", "PAPER_GPT2", "PositionSettings", "Settings", "run_ioi", "run_positions"]
