"""Triton Inference Server model repositories: ``config.pbtxt`` and the repository writer."""
