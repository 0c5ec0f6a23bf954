"""anyprec-jax: Any-Precision LLM (Park et al., ICML 2024, arXiv 2402.10517) in JAX/Pallas."""

from anyprec_jax.weight import AnyPrecWeight, dequantize, from_codes, set_precision
from anyprec_jax.ops import Backend, linear, use_backend

__version__ = "0.1.0"
from anyprec_jax.runtime import AnyPrecisionForCausalLM
