"""Thin command-line tools of v2d: parse arguments, load the config, call library code, write outputs."""
