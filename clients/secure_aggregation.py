"""The client's side of SecAgg+: keys, shares, the masked vector, and the checks it owes itself.

The server side and the protocol are described in
:mod:`strategies.secure_aggregation`. The client keeps its round secrets
(private keys, self-mask seed, the shares it holds) in ``Context.state``
between the round's messages and deletes them after it unmasks, and refuses,
with an error reply, any request that would let the server learn more than
the sum: a threshold at or below half its neighbourhood, a key list that
replaced its own key or repeats one, shares not addressed to it, a stage out
of order, or an unmask request naming a node as both survivor and dropped
(which would reveal both of its secrets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from privacy.randomness import secure_generator
from secagg import keys
from secagg.masking import apply_masks, ring_dtype, to_ring
from secagg.vectors import VectorSpec, encode, flatten
from strategies import protocol

#: Context.state entry holding this node's secrets of the current secure round.
STATE_KEY = "secagg-state"


class SecAggRefused(ValueError):
    """A stage message the client will not answer (it answers with an error reply)."""


def is_secure_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a train message belongs to, or ``None`` for a plain train message."""
    config = msg.content.get(protocol.CONFIG) if msg.has_content() else None
    if config is None or protocol.SECAGG_STAGE not in config:
        return None
    stage = str(config[protocol.SECAGG_STAGE])
    if stage not in protocol.SECAGG_STAGES:
        raise SecAggRefused(f"unknown secure aggregation stage {stage!r}")
    return stage


def refusal(msg: Message, reason: str) -> Message:
    """The error reply to a refused stage message (no content)."""
    return Message(
        Error(code=protocol.ERROR_SECAGG_REFUSED, reason=f"secure aggregation: {reason}"),
        reply_to=msg,
    )


def _state(context: Context, server_round: int, stage: str) -> ConfigRecord:
    state = context.state.get(STATE_KEY)
    if not isinstance(state, ConfigRecord):
        raise SecAggRefused(f"no secure round in progress before {stage!r}")
    if int(state["round"]) != server_round:
        raise SecAggRefused(
            f"{stage!r} for round {server_round}, but the secure round in progress is "
            f"{int(state['round'])}"
        )
    return state


def _expect(state: ConfigRecord, previous: str, stage: str) -> None:
    if state["stage"] != previous:
        raise SecAggRefused(f"{stage!r} must follow {previous!r}, not {state['stage']!r}")


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.get(protocol.SECAGG_RECORD)
    if not isinstance(record, ConfigRecord):
        raise SecAggRefused(f"message has no '{protocol.SECAGG_RECORD}' record")
    return record


def _round(msg: Message) -> int:
    return int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])


# ------------------------------------------------------------------ stage 1
def setup(msg: Message, context: Context) -> Message:
    """Check the neighbourhood and threshold; answer with two fresh public keys."""
    config = msg.content[protocol.CONFIG]
    neighbours = [int(v) for v in config[protocol.SECAGG_NEIGHBOURS]]
    threshold = int(config[protocol.SECAGG_THRESHOLD])
    size = len(neighbours) + 1
    if context.node_id in neighbours or len(set(neighbours)) != len(neighbours):
        raise SecAggRefused("neighbour list names this node or repeats a node")
    if not neighbours:
        raise SecAggRefused("no neighbours: a sum of this node alone would be its update")
    if not size / 2 < threshold <= size:
        raise SecAggRefused(
            f"threshold {threshold} of {size} key holders must be above half of them, "
            "or two groups of them could rebuild both of this node's secrets"
        )
    sk_enc, pk_enc = keys.generate_key_pairs()
    sk_mask, pk_mask = keys.generate_key_pairs()
    context.state[STATE_KEY] = ConfigRecord(
        {
            "round": _round(msg),
            "stage": protocol.SECAGG_SETUP,
            "neighbours": neighbours,
            "threshold": threshold,
            "sk-enc": keys.private_key_to_bytes(sk_enc),
            "sk-mask": keys.private_key_to_bytes(sk_mask),
            "pk-mask": keys.public_key_to_bytes(pk_mask),
            "pk-enc": keys.public_key_to_bytes(pk_enc),
        }
    )
    return Message(
        RecordDict(
            {
                protocol.SECAGG_RECORD: ConfigRecord(
                    {
                        protocol.SECAGG_PK_ENCRYPTION: keys.public_key_to_bytes(pk_enc),
                        protocol.SECAGG_PK_MASK: keys.public_key_to_bytes(pk_mask),
                    }
                )
            }
        ),
        reply_to=msg,
    )


# ------------------------------------------------------------------ stage 2
def share_keys(msg: Message, context: Context) -> Message:
    """Shamir-share the self-mask seed and the mask key; encrypt one share per key holder."""
    state = _state(context, _round(msg), protocol.SECAGG_SHARE_KEYS)
    _expect(state, protocol.SECAGG_SETUP, protocol.SECAGG_SHARE_KEYS)
    record = _record(msg)
    holders = [int(v) for v in record[protocol.SECAGG_NODES]]
    pk_enc = list(record[protocol.SECAGG_PK_ENCRYPTION])
    pk_mask = list(record[protocol.SECAGG_PK_MASK])
    me = context.node_id
    allowed = set(int(v) for v in state["neighbours"]) | {me}
    if len(pk_enc) != len(holders) or len(pk_mask) != len(holders):
        raise SecAggRefused("one pair of public keys per key holder is required")
    if not set(holders) <= allowed or len(set(holders)) != len(holders) or me not in holders:
        raise SecAggRefused("key holders must be distinct neighbours of this node and itself")
    if len(set(pk_enc + pk_mask)) != 2 * len(holders):
        raise SecAggRefused("two key holders advertise the same public key")
    mine = holders.index(me)
    if pk_enc[mine] != state["pk-enc"] or pk_mask[mine] != state["pk-mask"]:
        raise SecAggRefused("the server replaced this node's own public keys")
    threshold = int(state["threshold"])
    if len(holders) < threshold:
        raise SecAggRefused(f"{len(holders)} key holders, fewer than the threshold {threshold}")
    peers_enc = [keys.load_public_key(k) for k in pk_enc]
    seed = keys.new_self_seed()
    seed_shares = keys.create_shares(seed, threshold, len(holders))
    key_shares = keys.create_shares(bytes(state["sk-mask"]), threshold, len(holders))
    sk_enc = keys.private_key_from_bytes(bytes(state["sk-enc"]))
    dsts, texts = [], []
    for index, node in enumerate(holders):
        if node == me:
            continue
        dsts.append(node)
        texts.append(
            keys.encrypt_share(
                sk_enc, peers_enc[index], me, node, seed_shares[index], key_shares[index]
            )
        )
    state["stage"] = protocol.SECAGG_SHARE_KEYS
    state["seed"] = seed
    state["holders"] = holders
    state["holders-pk-enc"] = pk_enc
    state["holders-pk-mask"] = pk_mask
    state["own-seed-share"] = seed_shares[mine]
    context.state[STATE_KEY] = state
    return Message(
        RecordDict(
            {
                protocol.SECAGG_RECORD: ConfigRecord(
                    {
                        protocol.SECAGG_NODES: dsts,
                        protocol.SECAGG_CIPHERTEXTS: texts,
                        protocol.SECAGG_SEED_COMMITMENT: keys.commitment(seed),
                    }
                )
            }
        ),
        reply_to=msg,
    )


# ------------------------------------------------------------------ stage 3
@dataclass(frozen=True)
class MaskingPlan:
    """What the collect stage's masking needs, checked before the node trains."""

    spec: VectorSpec
    peers: list[int]


def vector_spec(config: Mapping[str, object]) -> VectorSpec:
    """The round's vector encoding from the collect message's config."""
    prefix = protocol.SECAGG_VECTOR_PREFIX
    values = {
        key[len(prefix):].replace("-", "_"): value
        for key, value in config.items()
        if key.startswith(prefix)
    }
    try:
        return VectorSpec(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise SecAggRefused(f"bad vector encoding: {error}") from None


def receive_shares(msg: Message, context: Context) -> MaskingPlan:
    """Decrypt and keep the shares addressed to this node; the peers it will mask with."""
    state = _state(context, _round(msg), protocol.SECAGG_COLLECT)
    _expect(state, protocol.SECAGG_SHARE_KEYS, protocol.SECAGG_COLLECT)
    record = _record(msg)
    sources = [int(v) for v in record[protocol.SECAGG_NODES]]
    texts = list(record[protocol.SECAGG_CIPHERTEXTS])
    holders = [int(v) for v in state["holders"]]
    me = context.node_id
    if len(texts) != len(sources) or len(set(sources)) != len(sources):
        raise SecAggRefused("one share per distinct source is required")
    if not set(sources) <= set(holders) - {me}:
        raise SecAggRefused("shares from nodes that are not this node's key holders")
    if len(sources) + 1 < int(state["threshold"]):
        raise SecAggRefused("fewer key holders left than the threshold")
    sk_enc = keys.private_key_from_bytes(bytes(state["sk-enc"]))
    pk_enc = list(state["holders-pk-enc"])
    seed_shares, key_shares = [], []
    for source, text in zip(sources, texts):
        peer = keys.load_public_key(pk_enc[holders.index(source)])
        try:
            src, dst, seed_share, key_share = keys.decrypt_share(sk_enc, peer, text)
        except ValueError as error:
            raise SecAggRefused(f"share from node {source}: {error}") from None
        if (src, dst) != (source, me):
            raise SecAggRefused(f"share from node {source} is addressed {src}->{dst}")
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    spec = vector_spec(msg.content[protocol.CONFIG])
    state["stage"] = protocol.SECAGG_COLLECT
    state["peers"] = sources
    state["peer-seed-shares"] = seed_shares
    state["peer-key-shares"] = key_shares
    context.state[STATE_KEY] = state
    return MaskingPlan(spec, sources)


def masked_reply(
    msg: Message,
    context: Context,
    plan: MaskingPlan,
    local: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    num_examples: int,
) -> Message:
    """Encode this node's update (:func:`secagg.vectors.encode`) and mask it.

    Only the shared arrays the server sent enter the vector; the reply holds
    nothing but the masked ring elements (no metrics, no example count).
    """
    state = context.state[STATE_KEY]
    keys_ = sorted(global_arrays)
    update = flatten(local, keys_) - flatten(global_arrays, keys_)
    try:
        vector = encode(update, num_examples, plan.spec, secure_generator())
    except ValueError as error:
        raise SecAggRefused(f"this node will not send its update: {error}") from None
    sk_mask = keys.private_key_from_bytes(bytes(state["sk-mask"]))
    holders = [int(v) for v in state["holders"]]
    pk_mask = list(state["holders-pk-mask"])
    pair_seeds = {
        peer: keys.mask_seed(sk_mask, keys.load_public_key(pk_mask[holders.index(peer)]))
        for peer in plan.peers
    }
    bits = plan.spec.modulus_bits
    masked = apply_masks(
        to_ring(vector, bits), bytes(state["seed"]), pair_seeds, context.node_id, bits
    )
    array = Array(masked.astype(ring_dtype(bits)))
    return Message(
        RecordDict({protocol.SECAGG_MASKED: ArrayRecord({protocol.SECAGG_MASKED: array})}),
        reply_to=msg,
    )


# ------------------------------------------------------------------ stage 4
def unmask(msg: Message, context: Context) -> Message:
    """Hand over the shares removing the survivors' self masks and the dropped nodes' pair masks."""
    state = _state(context, _round(msg), protocol.SECAGG_UNMASK)
    _expect(state, protocol.SECAGG_COLLECT, protocol.SECAGG_UNMASK)
    record = _record(msg)
    survivors = [int(v) for v in record[protocol.SECAGG_SURVIVORS]]
    dropped = [int(v) for v in record[protocol.SECAGG_DROPPED]]
    me = context.node_id
    peers = [int(v) for v in state["peers"]]
    if set(survivors) & set(dropped):
        raise SecAggRefused("a node named both survivor and dropped (both its secrets asked)")
    if me not in survivors or not set(survivors) - {me} <= set(peers):
        raise SecAggRefused("survivors must be this node and peers whose shares it holds")
    if not set(dropped) <= set(peers) or len(set(dropped)) != len(dropped):
        raise SecAggRefused("dropped nodes must be distinct peers whose shares it holds")
    if len(set(survivors)) != len(survivors) or len(survivors) < int(state["threshold"]):
        raise SecAggRefused("fewer survivors than the threshold")
    seed_by_peer = dict(zip(peers, state["peer-seed-shares"]))
    key_by_peer = dict(zip(peers, state["peer-key-shares"]))
    seeds = [
        bytes(state["own-seed-share"]) if node == me else seed_by_peer[node] for node in survivors
    ]
    reply = ConfigRecord(
        {
            protocol.SECAGG_SEED_SHARES: seeds,
            protocol.SECAGG_KEY_SHARES: [key_by_peer[node] for node in dropped],
        }
    )
    del context.state[STATE_KEY]  # the round's secrets are gone: no second unmask
    return Message(RecordDict({protocol.SECAGG_RECORD: reply}), reply_to=msg)


STAGE_HANDLERS = {
    protocol.SECAGG_SETUP: setup,
    protocol.SECAGG_SHARE_KEYS: share_keys,
    protocol.SECAGG_UNMASK: unmask,
}


def handle_key_stage(stage: str, msg: Message, context: Context) -> Message:
    """Answer a setup, share-keys or unmask message (no training), or refuse it."""
    try:
        return STAGE_HANDLERS[stage](msg, context)
    except (SecAggRefused, KeyError, TypeError, ValueError) as error:
        return refusal(msg, str(error))
