"""moejax experiments: absl apps (train.py) and ml_collections configs."""
