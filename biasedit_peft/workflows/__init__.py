"""Experiments built from the library: the end-to-end demo, the benchmarks, the layer sweep and the evaluation
protocols. They sit above data, scoring, the editor and the tuner, and below the CLI, which only parses, calls them
and prints (docs/architecture.md)."""
