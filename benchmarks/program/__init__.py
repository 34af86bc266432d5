"""The training program's own cost: ``python -m benchmarks.program``.

Measures, in one run on the machine at hand, what the program adds to the job it does: its main
command's wall time against a minimal script doing the same job (``minimal_digits.py``), and its
steady-state training throughput against a plain jitted loop over the same model, optimizer and
batches; both printed as ratios.
"""
