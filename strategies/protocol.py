"""Keys of the messages exchanged by the ServerApp and the ClientApp, in one place.

Both sides import these names; a key written as a string literal on one side
only is a protocol that can drift silently.
"""

from __future__ import annotations

# ------------------------------------------------------------ message records
#: The RecordDict entry holding the model's arrays (global or local).
ARRAYS = "arrays"
#: The RecordDict entry holding the train or evaluate config sent to a client.
CONFIG = "config"
#: The RecordDict entry holding a client's reply metrics.
METRICS = "metrics"

# ------------------------------------------------------- train/evaluate config
#: The round the message belongs to.
SERVER_ROUND = "server-round"
#: Local epochs, batch size and learning rate of the round's local training.
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
#: The server's run folder name: a client keys its sample-privacy ledger by it,
#: so a resumed run (a new Flower run id) goes on with the same ledger.
RUN_KEY = "run-key"
#: Rounds an earlier run did before this (resumed) run.
ROUNDS_BEFORE_RESUME = "rounds-before-resume"
#: DP-FedAvg with client-side clipping: the norm each client clips its update to.
CLIPPING_NORM = "clipping-norm"
#: Local DP: the per-round (epsilon, delta) and the Gaussian stddev clients add.
LOCAL_DP_EPSILON = "local-dp-epsilon"
LOCAL_DP_DELTA = "local-dp-delta"
LOCAL_DP_STDDEV = "local-dp-noise-stddev"

# --------------------------------------------------------------- reply metrics
#: Training examples behind a reply (FedAvg's weight).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
#: A client's sample-level (DP-SGD) privacy spent so far in this run.
SAMPLE_EPSILON = "sample-epsilon"
SAMPLE_DELTA = "sample-delta"
SAMPLE_ROUNDS = "sample-rounds"
SAMPLE_STEPS = "sample-steps"
SAMPLE_BUDGET_EXHAUSTED = "sample-budget-exhausted"
#: The node's lifetime sample-level epsilon, composed over every run on it.
SAMPLE_EPSILON_ALL_RUNS = "sample-epsilon-all-runs"

# ------------------------------------------------------------ error reply codes
#: A reply refused by the client's outgoing guard (it would carry a private weight).
ERROR_PRIVATE_WEIGHT_LEAK = 100
#: Another round of DP-SGD would take the node past its sample-level epsilon budget.
ERROR_SAMPLE_BUDGET_EXHAUSTED = 101
#: The train message asked for less privacy than the node's own limits allow.
ERROR_NODE_PRIVACY_LIMIT = 102

# ------------------------------------------------------ secure aggregation (SecAgg+)
#: Every SecAgg+ message is a train message whose config names its stage.
SECAGG_STAGE = "secagg-stage"
SECAGG_SETUP = "setup"
SECAGG_SHARE_KEYS = "share-keys"
SECAGG_COLLECT = "collect-masked"
SECAGG_UNMASK = "unmask"
SECAGG_STAGES = (SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_COLLECT, SECAGG_UNMASK)
#: The round's public SecAgg+ parameters and this node's neighbours.
SECAGG_NEIGHBOURS = "secagg-neighbours"
SECAGG_THRESHOLD = "secagg-threshold-count"
SECAGG_MODULUS_BITS = "secagg-modulus-bits"
SECAGG_QUANTIZATION_BITS = "secagg-quantization-bits"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
#: What the client puts in the secure sum: "weighted" (FedAvg), "clipped"
#: (DP-FedAvg, server noise) or "distributed-noise" (DP-FedAvg, each client's
#: share of the discrete Gaussian noise).
SECAGG_VECTOR = "secagg-vector"
#: Distributed noise: integer units per model unit, the rounded norm bound,
#: each client's discrete Gaussian stddev (integer units).
SECAGG_SCALE = "secagg-scale"
SECAGG_NORM_BOUND = "secagg-norm-bound"
SECAGG_LOCAL_NOISE_STDDEV = "secagg-local-noise-stddev"
#: Reply and request records of the stages.
SECAGG_RECORD = "secagg"
SECAGG_PK_ENCRYPTION = "pk-encryption"
SECAGG_PK_MASK = "pk-mask"
SECAGG_NODES = "nodes"
SECAGG_CIPHERTEXTS = "ciphertexts"
SECAGG_SURVIVORS = "survivors"
SECAGG_DROPPED = "dropped"
SECAGG_SEED_SHARES = "seed-shares"
#: SHA-256 of the self-mask seed, sent with the shares: a rebuilt seed is checked against it.
SECAGG_SEED_COMMITMENT = "seed-commitment"
SECAGG_KEY_SHARES = "key-shares"
SECAGG_MASKED = "masked"
#: A client that refuses a SecAgg+ request (a malformed or unsafe stage message,
#: or an update it will not send: NaN/Inf).
ERROR_SECAGG_REFUSED = 103
