"""MAGRAL: performance-driven reinforcement learning for active learning in object detection."""

__version__ = "0.1.0"
