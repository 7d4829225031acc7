"""Shared core of the kit: devices, comparisons, timing, checkpoints, engines and metric lines.

Every script imports it the same way: it puts `<repo>/tools` on `sys.path` and does `import kitcore`.
"""
