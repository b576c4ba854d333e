"""Hard-negative mining: the `encode` and `mine` stages and the negative-selection rules."""

from peg.mine.select import Selection, reference_positive_score, select_negatives
from peg.mine.stage import MineResult, run_encode, run_mine

__all__ = ["MineResult", "Selection", "reference_positive_score", "run_encode", "run_mine", "select_negatives"]
