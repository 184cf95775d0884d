"""Evaluation: COCO-MIG metrics, the evaluation loop, pictures."""
