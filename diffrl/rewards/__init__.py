"""Rewards other projects can import: ``from diffrl.rewards import GroundingDinoReward``.

    reward(images [B, 3, H, W] in [0, 1], layouts) -> RewardOutput(rewards [B], info)

- `ShapesReward` ("shapes"): the exact Shapes-world detector, I-DRUID's IoU + confidence.
- `GroundingDinoReward` ("gdino"): I-DRUID's reward with Grounding DINO.
- `CycleConsistencyReward` ("cycle"): EchoGen's layout → image → layout box consistency.
- `CompositeReward` / `build_reward("gdino=1,cycle=0.5")`: weighted sums, each part logged.
- `HttpReward` ("http", ``--reward http://host:port/score``): a reward served by ``diffrl serve-reward NAME``.

Importing this package is cheap: no Ray, no transformers, no SciPy, no envs/policies/algos; the
detectors load when a reward is built.
"""

from diffrl.rewards.base import Reward, RewardOutput
from diffrl.rewards.compose import CompositeReward, build_reward, parse_reward_spec
from diffrl.rewards.cycle import CycleConsistencyReward
from diffrl.rewards.gdino import GroundingDinoReward
from diffrl.rewards.grounder import Grounder, GroundingDinoGrounder, Grounding, ShapesGrounder
from diffrl.rewards.http import HttpReward
from diffrl.rewards.shapes import ShapesReward

__all__ = ["Reward", "RewardOutput", "ShapesReward", "GroundingDinoReward", "CycleConsistencyReward",
           "CompositeReward", "build_reward", "parse_reward_spec", "Grounder", "Grounding",
           "GroundingDinoGrounder", "ShapesGrounder", "HttpReward"]
