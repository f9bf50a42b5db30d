"""Echo-server benchmarks: trio_evlisten against trio, asyncio, uvloop and C.

Run ``python -m benchmarks --smoke`` (seconds; what CI runs) or
``python -m benchmarks`` (the full run that writes docs/benchmarks.md and
docs/bench.png). See :mod:`benchmarks.run` and docs/benchmarks.md.
"""
