"""Any-precision quantization: sensitivity, seed k-means, incremental upscaling, pipeline."""
