"""The candidate AGD variants tried before ``agd_optax.agd_momentum`` was chosen, and the
calibration loop that chose it (``python -m benchmarks.variants``; protocol in
``docs/agd_variants.md``)."""

from benchmarks.variants.candidates import CANDIDATES, Candidate

__all__ = ["CANDIDATES", "Candidate"]
