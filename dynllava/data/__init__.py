"""Synthetic image-text data (procedural shape scenes) and the grader that scores answers against it."""
