"""The Flower ServerApp and ClientApp that wire data, clients and strategies together."""

# First, before anything imports TensorFlow, Ray or dp-accounting: a quiet,
# readable log (FEDPRIVACY_VERBOSE=1 for everything). See app/logs.py.
from app import logs as _logs

_logs.configure()
