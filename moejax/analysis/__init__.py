"""Analysis of trained and pretrained models (routing statistics)."""
