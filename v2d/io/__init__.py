"""Readers and writers at the boundary between v2d's tensors and files."""
