"""Networks, losses, patch sampling, the training loop and Optuna tuning."""
