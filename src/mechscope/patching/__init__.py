"""Activation patching: which components carry the difference between a clean and a corrupt run."""

from mechscope.patching.attribution import attribution_patch
from mechscope.patching.exact import activation_patch
from mechscope.patching.path import path_patch, record_runs
from mechscope.patching.path_attribution import path_attribution
from mechscope.patching.result import PatchResult
from mechscope.patching.sites import SITES

__all__ = ["SITES", "PatchResult", "activation_patch", "attribution_patch", "path_attribution", "path_patch", "record_runs"]
