"""Reading a model's jaxpr for :func:`agd_optax.trace_roles`, one concept per module.

* ``values``: what is known of each value of the computation, and of each parameter's uses;
* ``interpreter``: runs a jaxpr on those values, each primitive by its rule (``RULES``);
* ``weights``: the rules that make a parameter a weight (``dot_general``, convolutions, lookups);
* ``structure``: the rules that move, combine or loop over values.
"""
