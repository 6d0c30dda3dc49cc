"""Worlds: planted synthetic worlds with their exact oracles, and the tiny random-weight SD1.5 builder.

Used by the tests, the benchmarks and the demo; nothing below this layer imports it."""
