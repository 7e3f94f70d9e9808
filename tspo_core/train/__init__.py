"""Training: SFT warmup on oracle trajectories and the TSPO/GRPO RL loop."""
