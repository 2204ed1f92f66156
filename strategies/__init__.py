"""Our Flower strategies: pure numpy aggregation math with thin Flower glue (no TensorFlow)."""
