"""Keras 3 models, local training and the weights that clients exchange."""

import os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) drowns the
# per-round log in every simulation worker; keep warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
