"""The training engine: the trainer and its loop, DeepSpeed configs and model building, distributed set-up,
faults and stop signals, metrics, evaluation, the start-up checks and summary."""
