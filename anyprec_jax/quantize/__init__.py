"""Any-precision quantization (Park et al., ICML 2024): sensitivity, seed k-means,
incremental upscaling, baselines and the model-walking pipeline.

Core math (arrays in, arrays out): `seed_kmeans`, `upscale`, `seed_and_upscale`,
`baselines.independent`, `baselines.squeezellm`, `baselines.rtn`, `fisher_information`. Whole models:
`quantize_model`.
"""

from anyprec_jax.quantize.config import (CalibrationConfig, LutDtype, Method,
                                         Nesting, QuantConfig, SplitMethod)
from anyprec_jax.quantize.kmeans import SeedResult, seed_kmeans
from anyprec_jax.quantize.upscaling import UpscaleResult, seed_and_upscale, upscale
from anyprec_jax.quantize.baselines import dequantize_codes, independent, rtn, squeezellm
from anyprec_jax.quantize.sensitivity import causal_lm_loss, fisher_information
from anyprec_jax.quantize.pipeline import RunOptions, quantize_model
