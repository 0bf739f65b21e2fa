"""Rewards for VLCoT-GRPO, as callables with TRL's reward signature, and the loader that builds them from recipes.

Built-in rewards (short names in ``REWARDS``):

=============  ==========================  ===================================================================
short name     class                       scores
=============  ==========================  ===================================================================
format         ``FormatReward``            the seven VLCoT blocks present, closed, in order, well-formed
degradation    ``DegradationReward``       predicted level per degradation step vs the recorded levels
understanding  ``UnderstandingReward``     the sample's object tags found in the coarse description
generation     ``GenerationReward``        no-reference quality of the final image (pyiqa ensemble)
fidelity       ``FidelityReward``          final image vs the LR input (downscaled) and vs HR when present
=============  ==========================  ===================================================================

See ``docs/rewards.md`` for what a reward receives and how to write one.
"""

from .base import Reward
from .degradation import DegradationReward
from .fidelity import FidelityReward
from .format import FormatReward
from .generation import DEFAULT_METRICS, GenerationReward
from .guard import GuardedReward, RewardError, guard_reward
from .iqa_weights import MetricUnavailableError, weight_files
from .loader import REWARDS, RewardSpec, build_reward, load_rewards, recipe_specs
from .understanding import UnderstandingReward

__all__ = [
    "DEFAULT_METRICS",
    "REWARDS",
    "DegradationReward",
    "FidelityReward",
    "FormatReward",
    "GenerationReward",
    "GuardedReward",
    "MetricUnavailableError",
    "Reward",
    "RewardError",
    "RewardSpec",
    "UnderstandingReward",
    "build_reward",
    "guard_reward",
    "load_rewards",
    "recipe_specs",
    "weight_files",
]
