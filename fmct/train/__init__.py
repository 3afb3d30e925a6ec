"""Training: supervised fine-tuning of task heads, calibration, and the demo-model recipe."""
