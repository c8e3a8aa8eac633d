"""Flax Linen modules of Semantic-SAM, one file per part of the paper's figure."""
