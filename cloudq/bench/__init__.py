"""Benchmarks (``cloudq bench …``): not part of any role's runtime, and not run by the tests.

Like the CLI they are harnesses that may import every role (the client kernel to measure the
node, the store to time it). Each prints a table and writes a markdown section only when asked
(``--write PATH``); BENCHMARKS.md in the repository holds the numbers the README quotes.
"""
