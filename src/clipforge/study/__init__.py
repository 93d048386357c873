"""Reproducible studies: a grid of training variants x seeds on the embedded data, with a results report.

`clipforge study FILE` runs one (see `configs/study.yaml` and `docs/study.md`).
"""

from .config import Cell, Study, Variant, build_study, expand_cells, load_study
from .runner import StudyOutcome, run_study

__all__ = ["Cell", "Study", "Variant", "build_study", "expand_cells", "load_study", "run_study", "StudyOutcome"]
