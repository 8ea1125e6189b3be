"""Training state shared by the SFT and RL learners: optimizer, steps, checkpoints."""
