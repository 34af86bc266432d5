"""agd_optax: Automatic Gradient Descent for JAX, as an optax gradient transformation."""

from agd_optax._agd import AGDState, agd, scale_by_agd
from agd_optax._agd_momentum import AGDMomentumState, agd_momentum, scale_by_agd_momentum
from agd_optax._flax import nnx_roles  # Imports flax only when called.
from agd_optax._hypergradient import (
    HypergradientState,
    hypergradient,
    hypergradient_tower,
    learned_hyperparams,
)
from agd_optax._initializers import conv_init, dense_init, reinitialize, scaled_orthogonal
from agd_optax._layouts import Layout, resolve_layouts
from agd_optax._naming import infer_roles
from agd_optax._pytorch import pytorch_roles
from agd_optax._roles import (
    Role,
    RoleError,
    bias,
    conv,
    dense,
    embedding,
    norm,
)
from agd_optax._trace import trace_roles

__version__ = "0.1.0"

__all__ = [
    "AGDMomentumState",
    "AGDState",
    "HypergradientState",
    "Layout",
    "Role",
    "RoleError",
    "agd",
    "agd_momentum",
    "bias",
    "conv",
    "conv_init",
    "dense",
    "dense_init",
    "embedding",
    "hypergradient",
    "hypergradient_tower",
    "infer_roles",
    "learned_hyperparams",
    "nnx_roles",
    "norm",
    "pytorch_roles",
    "reinitialize",
    "resolve_layouts",
    "scale_by_agd",
    "scale_by_agd_momentum",
    "scaled_orthogonal",
    "trace_roles",
]
