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
#: The setup message: this node's neighbours and how many shares rebuild its secrets.
SECAGG_NEIGHBOURS = "secagg-neighbours"
SECAGG_THRESHOLD = "secagg-threshold-count"
#: The collect message's config carries the round's vector encoding
#: (:class:`secagg.vectors.VectorSpec`) as keys with this prefix: kind
#: ("weighted", "clipped", "distributed-noise"), clipping-range,
#: quantization-bits, modulus-bits, max-weight, scale, norm-bound, local-noise-stddev.
SECAGG_VECTOR_PREFIX = "secagg-vector-"
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
