"""Learners (PPO, GRPO), flow-matching pre-training, and the training loop."""
