"""Benchmarks behind ``medattn bench NAME``; each module defines add_arguments/run."""
