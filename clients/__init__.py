"""Keras 3 models, local training and the weights that clients exchange."""

import os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes, the cuInit
# ERROR on machines without a GPU) drowns the per-round log in every
# simulation worker; 3 keeps only FATAL. ``clients`` may not import ``app``,
# so this repeats the TensorFlow part of app/logs.py for direct users of
# ``clients`` (the apps import app/ first). FEDPRIVACY_VERBOSE=1 keeps it all.
if os.environ.get("FEDPRIVACY_VERBOSE", "").strip().lower() not in {"1", "true", "yes", "on"}:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
