"""Active-learning simulation: paper 000's Algorithm 1 (and paper 004's region mode) end to end.

The dense ground truth of a CamVid-layout dataset plays the annotator: the learner starts
with a few random labeled pixels (or superpixels) per image, and every cycle it trains,
is evaluated, and asks for more by an acquisition function. The record of mIoU against the
labeled fraction, per acquisition, is the evidence that an acquisition saves labeling.

- ``config``: a run's settings, the ``quick`` and ``paper`` profiles, resume compatibility
- ``pool``: the pool images and the oracle (what has been revealed, and when)
- ``queries``: the cold start and the pixel / region queries
- ``metrics``: IoU from a confusion matrix, query diversity (paper 000, Fig. 6)
- ``splits``: loading evenly spaced subsets, evaluation
- ``state``, ``report``: the resumable state file and the metrics files
- ``loop``: the cycle loop; ``plots``: figures and summary; ``cli``: ``segal-simulate``

Only ``cli`` and ``plots`` need matplotlib; importing this package does not load it.
"""

from .config import PROFILES, SimulationConfig, profile_config
from .loop import ConfigMismatch, RunResult, run_simulation

__all__ = ["PROFILES", "ConfigMismatch", "RunResult", "SimulationConfig", "profile_config", "run_simulation"]
