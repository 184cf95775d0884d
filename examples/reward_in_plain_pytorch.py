"""Use a diffrl reward in plain PyTorch: no diffrl env, policy or trainer, just ``reward(images, layouts)``.

A toy policy paints one red square per image: a Gaussian over the square's (x0, y0, side), trained
with REINFORCE to put the square where the layout asks. `ShapesReward` scores each image (I-DRUID's
IoU + confidence, with the exact detector of the Shapes world), and EchoGen's layout → image → layout
`CycleConsistencyReward`, with the Shapes detector as its grounder, scores the same batches. Swap in
`GroundingDinoReward()` for real images (it needs the Grounding DINO weights).

    python examples/reward_in_plain_pytorch.py
"""

import torch

from diffrl.layout import Layout
from diffrl.rewards import CycleConsistencyReward, ShapesReward

SIZE = 32  # image side in pixels
RED, BACKGROUND = (0.9, 0.1, 0.1), (0.5, 0.5, 0.5)  # colours of the Shapes world, which its detector knows
BATCH, STEPS = 16, 40


def paint(boxes: torch.Tensor) -> torch.Tensor:
    """boxes [B, 4] normalised xyxy → images [B, 3, SIZE, SIZE] in [0, 1]: a red square on grey."""
    centres = (torch.arange(SIZE) + 0.5) / SIZE
    x, y = centres.view(1, 1, SIZE), centres.view(1, SIZE, 1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = ((x >= x0) & (x < x1) & (y >= y0) & (y < y1))[:, None]  # [B, 1, SIZE, SIZE]
    return torch.where(inside, torch.tensor(RED).view(1, 3, 1, 1), torch.tensor(BACKGROUND).view(1, 3, 1, 1))


def main() -> None:
    torch.manual_seed(0)
    layouts = [Layout("a red square", ["red square"], [(0.5, 0.25, 0.875, 0.625)])] * BATCH
    mean = torch.nn.Parameter(torch.tensor([0.15, 0.15, 0.3]))  # x0, y0, side of the painted square
    log_std = torch.nn.Parameter(torch.full((3,), -1.5))
    optimizer = torch.optim.Adam([mean, log_std], lr=0.05)
    shapes, cycle = ShapesReward(), CycleConsistencyReward(distance="l1", grounder="shapes")
    history = []
    for step in range(STEPS):
        policy = torch.distributions.Normal(mean, log_std.exp())
        actions = policy.sample((BATCH,))  # [B, 3]
        corner, side = actions[:, :2].clamp(0, 0.9), actions[:, 2:].clamp(0.1, 1)
        images = paint(torch.cat([corner, (corner + side).clamp(max=1)], dim=1))
        with torch.no_grad():
            rewards = shapes(images, layouts).rewards  # [B], in [0, 2]
            consistency = cycle(images, layouts).rewards  # [B], in [-1, 0]
        advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        loss = -(policy.log_prob(actions).sum(-1) * advantage).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((rewards.mean().item(), consistency.mean().item()))
    (start, start_cycle), (end, end_cycle) = history[0], history[-1]
    print(f"shapes reward: start {start:.3f} -> end {end:.3f}")
    print(f"cycle reward:  start {start_cycle:.3f} -> end {end_cycle:.3f}")


if __name__ == "__main__":
    main()
