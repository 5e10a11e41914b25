"""ml_collections config files: get_config(arg) and sweep() each."""
