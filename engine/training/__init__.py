"""Training: the config, the trainer shared by every architecture, its run folder, schedule and log."""
