"""SecAgg+ from the attacker's side and under dropouts, without TensorFlow (tests/secagg_harness.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from secagg.masking import from_ring, prg_mask, to_ring
from secagg.parameters import SecAggError, SecAggParameters, neighbour_graph
from secagg.vectors import CLIPPED, WEIGHTED, VectorSpec, decode, flatten, rounding_bound
from strategies import protocol
from strategies.aggregation import finite_weighted_mean
from strategies.secure_aggregation import SecAggPlus
from tests.secagg_harness import SecureGrid, masked_vectors, train_content

PARAMS = SecAggParameters()
SHAPES = {"dense/kernel": (200, 60), "dense/bias": (60,), "out/kernel": (60, 10)}
NODES = [101, 102, 103, 104, 105]


def federation(seed: int = 0, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    global_arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    local = {
        node: {
            k: (v + rng.normal(scale=scale, size=v.shape)).astype(np.float32)
            for k, v in global_arrays.items()
        }
        for node in NODES
    }
    examples = {node: int(rng.integers(20, 400)) for node in NODES}
    return global_arrays, local, examples


def weighted_spec(params: SecAggParameters = PARAMS) -> VectorSpec:
    return VectorSpec(WEIGHTED, params.clipping_range, params.quantization_bits,
                      params.modulus_bits, max_weight=params.max_weight)


def num_parameters() -> int:
    return sum(math.prod(s) for s in SHAPES.values())


def secure_round(grid: SecureGrid, global_arrays, spec=None, params=PARAMS, nodes=NODES):
    spec = spec or weighted_spec(params)
    return SecAggPlus(params).run(
        grid, 1, train_content(global_arrays), nodes, spec,
        spec.length(num_parameters()), timeout=60,
    ), spec


def plain_mean(global_arrays, local, examples, nodes):
    mean, rejected = finite_weighted_mean([local[n] for n in nodes], [examples[n] for n in nodes])
    assert not rejected
    return flatten(mean, sorted(global_arrays))


def secure_mean(result, spec, global_arrays):
    decoded = decode(result.total, spec, num_parameters())
    return flatten(global_arrays, sorted(global_arrays)) + decoded.update_sum * (
        spec.max_weight / decoded.weight_total
    ), decoded


# ------------------------------------------------------------ the attacker's view
def test_no_masked_vector_the_server_receives_correlates_with_its_clients_update() -> None:
    global_arrays, local, examples = federation()
    grid = SecureGrid(local, examples)
    result, spec = secure_round(grid, global_arrays)
    keys = sorted(global_arrays)
    masked = masked_vectors(grid)
    assert sorted(masked) == NODES and num_parameters() >= 10_000
    for node, vector in masked.items():
        update = flatten(local[node], keys) - flatten(global_arrays, keys)
        seen = vector[: update.size].astype(np.float64)
        assert abs(np.corrcoef(seen, update)[0, 1]) < 0.05
        # The same statistic can fail: the unmasked encoding correlates almost perfectly.
        clear = from_ring(to_ring(np.round(update * 2**21 * examples[node] / 1e4), 32), 32)
        assert np.corrcoef(clear.astype(np.float64), update)[0, 1] > 0.99
    # Every other message the server receives holds keys or encrypted shares only.
    for reply in grid.received:
        assert set(reply.content.keys()) <= {protocol.SECAGG_RECORD, protocol.SECAGG_MASKED}
        if protocol.SECAGG_MASKED in reply.content:
            assert list(reply.content[protocol.SECAGG_MASKED].keys()) == [protocol.SECAGG_MASKED]
    # ... while the unmasked aggregate is FedAvg's, within the stated bound.
    mean, decoded = secure_mean(result, spec, global_arrays)
    expected = plain_mean(global_arrays, local, examples, NODES)
    bound = rounding_bound(spec, len(NODES)) * spec.max_weight / decoded.weight_total
    assert decoded.weight_total == sum(examples.values())
    assert decoded.num_clamped == 0
    assert np.max(np.abs(mean - expected)) <= bound + 1e-6  # + float32 rounding of the plain mean
    assert np.max(np.abs(mean - expected)) > 0  # quantised, not the plain values sent


def test_flowers_mask_generator_has_2_to_the_32_masks_ours_has_2_to_the_256() -> None:
    """Why secagg.masking has its own PRG: Flower's folds a 32-byte seed into 32 bits."""
    seed = bytes(range(32))
    collided = bytes(range(4, 8)) + bytes(range(4)) + bytes(range(8, 32))  # same XOR of words
    assert seed != collided
    flower = pseudo_rand_gen(seed, 2**31, [(1000,)])[0]
    assert np.array_equal(flower, pseudo_rand_gen(collided, 2**31, [(1000,)])[0])
    ours, other = prg_mask(seed, 1000, 32), prg_mask(collided, 1000, 32)
    assert not np.array_equal(ours, other)
    big = prg_mask(seed, 200_000, 32).astype(np.float64)
    # Uniform on Z_2^32: mean 2^31, stddev 2^32 / sqrt(12); 6-sigma bounds on the mean.
    assert abs(big.mean() - 2**31) < 6 * (2**32 / math.sqrt(12)) / math.sqrt(big.size)


# ------------------------------------------------------------------ dropouts
@pytest.mark.parametrize("dropped", [[103], [102, 104]])
def test_clients_dropping_after_sharing_keys_leave_the_exact_sum_of_the_survivors(
    dropped: list[int],
) -> None:
    global_arrays, local, examples = federation(seed=1)
    grid = SecureGrid(local, examples, drop_from={n: protocol.SECAGG_COLLECT for n in dropped})
    result, spec = secure_round(grid, global_arrays)
    survivors = [n for n in NODES if n not in dropped]
    assert result.voided is None and result.contributors == survivors
    assert all("no reply" in result.failures[n] for n in dropped)
    mean, decoded = secure_mean(result, spec, global_arrays)
    assert decoded.weight_total == sum(examples[n] for n in survivors)
    bound = rounding_bound(spec, len(survivors)) * spec.max_weight / decoded.weight_total
    assert np.max(np.abs(mean - plain_mean(global_arrays, local, examples, survivors))) <= (
        bound + 1e-6
    )
    everyone = plain_mean(global_arrays, local, examples, NODES)
    assert np.max(np.abs(mean - everyone)) > 100 * bound  # the dropped ones are really out


def test_below_the_threshold_the_round_is_voided_and_nothing_is_unmasked() -> None:
    global_arrays, local, examples = federation(seed=2)
    # threshold 0.6 of 5 holders = 3: with 2 survivors nothing may be reconstructed.
    grid = SecureGrid(local, examples, drop_from={n: protocol.SECAGG_COLLECT for n in NODES[:3]})
    result, _ = secure_round(grid, global_arrays)
    assert result.total is None and result.threshold == 3
    assert "fewer than the threshold 3" in (result.voided or "")
    assert not any(
        str(m.content[protocol.CONFIG][protocol.SECAGG_STAGE]) == protocol.SECAGG_UNMASK
        for m in grid.sent
    )


def test_a_survivor_lost_before_unmasking_still_leaves_enough_shares_or_voids() -> None:
    global_arrays, local, examples = federation(seed=3)
    grid = SecureGrid(local, examples, drop_from={101: protocol.SECAGG_COLLECT,
                                                  102: protocol.SECAGG_UNMASK})
    result, spec = secure_round(grid, global_arrays)
    # 102's vector is in the sum; its self mask comes back from 3 of the 4 holders left.
    assert result.contributors == [102, 103, 104, 105]
    mean, _ = secure_mean(result, spec, global_arrays)
    expected = plain_mean(global_arrays, local, examples, [102, 103, 104, 105])
    assert np.max(np.abs(mean - expected)) < 1e-4
    grid = SecureGrid(local, examples, drop_from={101: protocol.SECAGG_COLLECT,
                                                  102: protocol.SECAGG_UNMASK,
                                                  103: protocol.SECAGG_UNMASK})
    result, _ = secure_round(grid, global_arrays)
    assert result.total is None and "cannot be rebuilt" in (result.voided or "")


def test_secagg_plus_with_a_sparse_graph_sums_exactly() -> None:
    nodes = list(range(201, 213))
    rng = np.random.default_rng(4)
    global_arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    local = {n: {k: v + np.float32(0.01) * n for k, v in global_arrays.items()} for n in nodes}
    examples = {n: 10 + n for n in nodes}
    params = SecAggParameters(neighbours=4)
    graph = neighbour_graph(nodes, 4, np.random.default_rng(0))
    assert all(len(v) == 4 for v in graph.values())
    assert all(a in graph[b] for a in nodes for b in graph[a])  # symmetric
    grid = SecureGrid(local, examples, drop_from={205: protocol.SECAGG_COLLECT})
    result, spec = secure_round(grid, global_arrays, params=params, nodes=nodes)
    survivors = [n for n in nodes if n != 205]
    mean, _ = secure_mean(result, spec, global_arrays)
    assert np.max(np.abs(mean - plain_mean(global_arrays, local, examples, survivors))) < 1e-4
    setup = [m for m in grid.sent
             if m.content[protocol.CONFIG][protocol.SECAGG_STAGE] == protocol.SECAGG_SETUP]
    assert all(len(m.content[protocol.CONFIG][protocol.SECAGG_NEIGHBOURS]) == 4 for m in setup)


# ------------------------------------------------------------------ malformed replies
def _replace_record(reply: Message, name: str, record) -> Message:
    return Message(RecordDict({name: record}), reply_to=_instruction_of(reply))


_SENT: dict[str, Message] = {}


def _instruction_of(reply: Message) -> Message:
    return _SENT[reply.metadata.reply_to_message_id]


@pytest.mark.parametrize(
    ("stage", "bad", "reason"),
    [
        (protocol.SECAGG_SETUP, ConfigRecord({protocol.SECAGG_PK_ENCRYPTION: b"junk",
                                              protocol.SECAGG_PK_MASK: b"junk"}),
         "not a public key"),
        (protocol.SECAGG_SHARE_KEYS, ConfigRecord({protocol.SECAGG_NODES: [101],
                                                   protocol.SECAGG_CIPHERTEXTS: [b"x"]}),
         "other key holders"),
        (protocol.SECAGG_COLLECT, ArrayRecord({protocol.SECAGG_MASKED: Array(np.zeros(3, np.uint32))}),
         "expected uint32"),
        (protocol.SECAGG_UNMASK, ConfigRecord({protocol.SECAGG_SEED_SHARES: [b"x"],
                                               protocol.SECAGG_KEY_SHARES: [b"y"]}),
         "one share per node"),
    ],
)
def test_a_malformed_reply_at_any_stage_is_rejected_with_its_reason_and_the_round_goes_on(
    stage: str, bad, reason: str
) -> None:
    global_arrays, local, examples = federation(seed=5)

    def tamper(node: int, at: str, reply: Message) -> Message:
        if node != 104 or at != stage:
            return reply
        name = protocol.SECAGG_MASKED if stage == protocol.SECAGG_COLLECT else (
            protocol.SECAGG_RECORD)
        return Message(RecordDict({name: bad}), reply_to=grid.sent[-1])

    grid = SecureGrid(local, examples, tamper=tamper)
    result, spec = secure_round(grid, global_arrays)
    assert reason in result.failures[104]
    if stage == protocol.SECAGG_UNMASK:
        # 104's vector is in the sum; its shares were refused, the others suffice.
        assert result.contributors == NODES
    else:
        assert 104 not in result.contributors and len(result.contributors) == 4
    assert result.total is not None
    survivors = result.contributors
    mean, _ = secure_mean(result, spec, global_arrays)
    assert np.max(np.abs(mean - plain_mean(global_arrays, local, examples, survivors))) < 1e-4


# ------------------------------------------------------------------ client refusals
def _client_grid():
    global_arrays, local, examples = federation(seed=6)
    return SecureGrid(local, examples), global_arrays


def _setup(grid: SecureGrid, node: int, neighbours: list[int], threshold: int) -> Message:
    from tests.messages import instruction

    msg = instruction(RecordDict({protocol.CONFIG: ConfigRecord({
        protocol.SERVER_ROUND: 1, protocol.SECAGG_STAGE: protocol.SECAGG_SETUP,
        protocol.SECAGG_NEIGHBOURS: neighbours, protocol.SECAGG_THRESHOLD: threshold})}), node)
    return grid.handle(msg)


def test_a_client_refuses_a_threshold_that_would_let_the_server_rebuild_both_its_secrets() -> None:
    grid, _ = _client_grid()
    reply = _setup(grid, 101, [102, 103, 104, 105], 2)  # 2 of 5: two disjoint groups
    assert reply.has_error() and reply.error.code == protocol.ERROR_SECAGG_REFUSED
    assert "above half" in reply.error.reason
    assert not _setup(grid, 101, [102, 103, 104, 105], 3).has_error()


def test_a_client_refuses_to_reveal_both_secrets_of_a_node_or_to_unmask_twice() -> None:
    from tests.messages import instruction

    global_arrays, local, examples = federation(seed=7)
    grid = SecureGrid(local, examples, drop_from={n: protocol.SECAGG_UNMASK for n in NODES})
    secure_round(grid, global_arrays)  # every node stops before unmasking

    def unmask(survivors: list[int], dropped: list[int]) -> Message:
        return grid.handle(instruction(RecordDict({
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1,
                                           protocol.SECAGG_STAGE: protocol.SECAGG_UNMASK}),
            protocol.SECAGG_RECORD: ConfigRecord({protocol.SECAGG_SURVIVORS: survivors,
                                                  protocol.SECAGG_DROPPED: dropped}),
        }), 101))

    both = unmask([101, 102, 103], [103])
    assert both.has_error() and "both" in both.error.reason
    fine = unmask([101, 102, 103], [104])
    assert not fine.has_error()
    again = unmask([101, 102, 103, 104], [])
    assert again.has_error() and "no secure round in progress" in again.error.reason


def test_a_client_refuses_when_the_server_replaces_its_own_public_key() -> None:
    from tests.messages import instruction

    grid, _ = _client_grid()
    keys = {}
    for node in (101, 102, 103):
        reply = _setup(grid, node, [n for n in (101, 102, 103) if n != node], 2)
        record = reply.content[protocol.SECAGG_RECORD]
        keys[node] = (record[protocol.SECAGG_PK_ENCRYPTION], record[protocol.SECAGG_PK_MASK])
    keys[101] = keys[102][::-1]  # the server swaps in keys it controls (here: 102's)
    reply = grid.handle(instruction(RecordDict({
        protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1,
                                       protocol.SECAGG_STAGE: protocol.SECAGG_SHARE_KEYS}),
        protocol.SECAGG_RECORD: ConfigRecord({
            protocol.SECAGG_NODES: [101, 102, 103],
            protocol.SECAGG_PK_ENCRYPTION: [keys[n][0] for n in (101, 102, 103)],
            protocol.SECAGG_PK_MASK: [keys[n][1] for n in (101, 102, 103)],
        }),
    }), 101))
    assert reply.has_error()
    assert "same public key" in reply.error.reason or "replaced" in reply.error.reason


def test_a_client_will_not_mask_and_send_an_update_holding_nan() -> None:
    global_arrays, local, examples = federation(seed=8)
    local[103]["dense/bias"][0] = np.nan
    grid = SecureGrid(local, examples)
    result, spec = secure_round(grid, global_arrays)
    assert "NaN or Inf" in result.failures[103]
    assert result.contributors == [101, 102, 104, 105]


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.5}, "secagg-threshold"),
        ({"neighbours": 3}, "secagg-neighbours"),
        ({"quantization_bits": 30, "modulus_bits": 31}, "secagg-modulus-bits"),
        ({"clipping_range": 0.0}, "secagg-clipping-range"),
        ({"max_weight": 0}, "secagg-max-weight"),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(kwargs, message) -> None:
    with pytest.raises(SecAggError, match=message):
        SecAggParameters(**kwargs)


def test_the_sum_cannot_wrap_for_the_number_of_clients_the_parameters_allow() -> None:
    params = SecAggParameters(quantization_bits=8, modulus_bits=12, max_weight=10)
    n = params.max_clients()
    values = np.full((n, 4), params.half_range, dtype=np.int64)
    values[:, 1] = -params.half_range
    total = sum(to_ring(v, 12) for v in values)
    assert np.array_equal(from_ring(total, 12), values.sum(axis=0))
    wrapped = sum(to_ring(v, 12) for v in np.vstack([values, values[:1]]))
    assert not np.array_equal(from_ring(wrapped, 12), values.sum(axis=0) + values[0])


def test_clipped_vectors_keep_the_norm_within_c_after_rounding() -> None:
    rng = np.random.default_rng(9)
    spec = VectorSpec(CLIPPED, 1.0, 8, 32)  # coarse: the rounding margin matters
    from secagg.vectors import encode

    for _ in range(200):
        update = rng.normal(size=500) * 10
        vector = encode(update, 1, spec, rng)
        assert vector[-1] == 0  # clipped
        assert np.linalg.norm(vector[:-1] / 2**7) <= 1.0 + 1e-12


def test_a_round_of_one_client_is_voided_and_a_client_refuses_to_be_summed_alone() -> None:
    global_arrays, local, examples = federation(seed=10)
    grid = SecureGrid(local, examples)
    result, _ = secure_round(grid, global_arrays, nodes=[101])
    assert result.total is None and "at least 2" in (result.voided or "")
    assert grid.sent == []
    reply = _setup(grid, 101, [], 1)
    assert reply.has_error() and "alone" in reply.error.reason


def test_bad_shares_void_the_round_rather_than_corrupt_the_sum() -> None:
    """Shares that rebuild another seed (consistent, well padded): only the commitment shows it."""
    from secagg.keys import create_shares

    global_arrays, local, examples = federation(seed=11)
    other = create_shares(bytes(range(32)), 3, 5)  # another seed, shared the same way

    def tamper(node: int, at: str, reply: Message) -> Message:
        if at != protocol.SECAGG_UNMASK or reply.has_error():
            return reply
        record = reply.content[protocol.SECAGG_RECORD]
        seeds = list(record[protocol.SECAGG_SEED_SHARES])
        index = int.from_bytes(seeds[0][:4], "little")  # 101's share, held by this node
        seeds[0] = other[index - 1]
        return Message(RecordDict({protocol.SECAGG_RECORD: ConfigRecord({
            protocol.SECAGG_SEED_SHARES: seeds,
            protocol.SECAGG_KEY_SHARES: list(record[protocol.SECAGG_KEY_SHARES]),
        })}), reply_to=grid.sent[-1])

    grid = SecureGrid(local, examples, tamper=tamper)
    result, _ = secure_round(grid, global_arrays)
    assert result.total is None
    assert "self mask of node 101" in (result.voided or "")
    assert "does not match its commitment" in (result.voided or "")


def test_batched_reconstruction_equals_flowers_combine_shares() -> None:
    """secagg.shamir against Flower's combine_shares (pycryptodome), byte for byte."""
    import random

    from Crypto.Protocol.SecretSharing import _Element
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    from secagg.keys import combine_shares_batch, create_shares
    from secagg.shamir import gf_inverse, gf_multiply

    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.getrandbits(128), rng.getrandbits(128)
        assert gf_multiply(a, b) == int(_Element(a) * _Element(b))
        if a:
            assert gf_multiply(a, gf_inverse(a)) == 1
    secrets = [bytes(rng.getrandbits(8) for _ in range(n)) for n in [32] * 40 + [48, 17, 1]]
    lists = []
    for index, secret in enumerate(secrets):
        shares = create_shares(secret, 7, 12)
        if index % 3 == 0:
            rng.shuffle(shares)  # other index sets for a third of them
        lists.append(shares[:7])
    assert combine_shares_batch(lists) == [combine_shares(s) for s in lists] == secrets
    with pytest.raises(ValueError):
        combine_shares_batch([lists[0][:6] + [lists[0][0]]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secure-aggregation": True, "aggregator": "median"}, "'aggregator' = 'median'"),
        ({"secure-aggregation": True, "strategy": "dp-fedavg", "local-dp-epsilon": 1.0,
          "noise-multiplier": 0.0}, "'local-dp-epsilon'"),
        ({"dp-noise": "distributed", "strategy": "dp-fedavg"}, "'dp-noise' = 'distributed'"),
        ({"dp-noise": "distributed", "secure-aggregation": True}, "'dp-noise' = 'distributed'"),
        ({"dp-noise": "distributed", "secure-aggregation": True, "strategy": "dp-fedavg",
          "clipping": "adaptive"}, "'clipping' = 'fixed'"),
        ({"dp-noise": "distributed", "secure-aggregation": True, "strategy": "dp-fedavg",
          "noise-multiplier": "auto", "target-epsilon": 3.0}, "'noise-multiplier' = 'auto'"),
        ({"secure-aggregation": True, "secagg-quantization-bits": 31}, "'secagg-modulus-bits'"),
        ({"secagg-neighbours": 3}, "'secagg-neighbours'"),
        ({"secagg-threshold": 0.5}, "'secagg-threshold'"),
    ],
)
def test_run_configs_secure_aggregation_cannot_serve_fail_naming_the_key(overrides, message):
    from app.config import ConfigError, parse_run_config
    from tests.test_config import defaults

    with pytest.raises(ConfigError, match=message):
        parse_run_config({**defaults(), **overrides})


def test_a_stage_that_needs_each_update_cannot_take_a_secure_sum() -> None:
    from strategies.fedavg import FedAvg
    from strategies.robust import CoordinateMedian

    with pytest.raises(ValueError, match="only their sum"):
        FedAvg(aggregator=CoordinateMedian(), secure_aggregation=SecAggPlus(PARAMS))
