"""SecAgg+ on Flower's Message API: the server learns the sum of the round's vectors, no single one.

Implementation of the server side of Bonawitz et al. (2017), "Practical
Secure Aggregation for Privacy-Preserving Machine Learning",
https://eprint.iacr.org/2017/281, with the sparse neighbour graph of Bell et
al. (2020), https://eprint.iacr.org/2020/704. One round is four message
exchanges, all ``train`` messages whose config names the stage
(:mod:`strategies.protocol`):

1. ``setup``: each sampled client gets its neighbours and the threshold and
   answers with two fresh public keys (encryption, mask agreement);
2. ``share-keys``: each gets its neighbours' public keys and answers with
   Shamir shares of its self-mask seed and mask private key, each share
   encrypted for one neighbour;
3. ``collect-masked``: each gets the global model, the train config and the
   shares addressed to it, trains, and answers with its masked vector;
4. ``unmask``: each survivor names, per neighbour, the self-mask share (that
   neighbour survived) or the mask-key share (it dropped after step 2); never
   both for one node.

The server rebuilds every survivor's self mask and every dropped client's pair
masks from at least ``t`` shares and decodes the sum. Too few survivors, or a
secret with fewer than ``t`` shares back, voids the round: nothing is
released and the model stays as it was. A malformed reply at any stage is
rejected with its reason and its node counts as dropped.

Who is protected against whom: each client's update against an
honest-but-curious server and up to ``t - 1`` colluding clients. What the
server cannot do any more: check a single update (NaN/Inf, norm); clients
check and clip their own, and the quantisation range bounds every
coordinate. An actively malicious client can still add any vector within
that range (the sum is unauthenticated input), or make a round void by
dropping out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from privacy.randomness import secure_generator
from secagg import keys
from secagg.masking import from_ring, mask_sign, prg_mask, reduce, ring_dtype
from secagg.parameters import SecAggParameters, neighbour_graph
from secagg.vectors import VectorSpec

from . import protocol
from .validation import InvalidReply, decode_array

_MAX_SHARE_BYTES = 4096


@dataclass
class SecureSum:
    """What a secure round gave the server.

    Attributes
    ----------
    total : ndarray or None
        The decoded int64 sum of the survivors' vectors; ``None`` when voided.
    contributors : list of int
        The nodes whose vectors are in the sum.
    failures : dict of int to str
        Node -> the stage at which it dropped or was rejected, and why.
    voided : str or None
        Why the round released nothing.
    stage_counts : dict of str to int
        Nodes left after each stage.
    bytes_from_clients : dict of int to int
        Bytes of every reply per node (content only).
    bytes_to_clients : dict of int to int
        Bytes of every message per node (content only).
    """

    total: np.ndarray | None
    contributors: list[int]
    failures: dict[int, str] = field(default_factory=dict)
    voided: str | None = None
    stage_counts: dict[str, int] = field(default_factory=dict)
    bytes_from_clients: dict[int, int] = field(default_factory=dict)
    bytes_to_clients: dict[int, int] = field(default_factory=dict)
    threshold: int = 0


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (arrays' data, config bytes and values)."""
    size = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            size += sum(len(array.data) for array in record.values())
        else:
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                size += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return size


def _record(message: Message) -> ConfigRecord:
    if message.has_error():
        raise InvalidReply(f"error reply: {message.error.reason}")
    if not message.has_content() or protocol.SECAGG_RECORD not in message.content:
        raise InvalidReply(f"reply has no '{protocol.SECAGG_RECORD}' record")
    record = message.content[protocol.SECAGG_RECORD]
    if not isinstance(record, ConfigRecord):
        raise InvalidReply(f"'{protocol.SECAGG_RECORD}' is not a ConfigRecord")
    return record


def _bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    value = record.get(key, None)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise InvalidReply(f"'{key}' must be a list of bytes")
    return value


def _int_list(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key, None)
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise InvalidReply(f"'{key}' must be a list of node ids")
    return value


@dataclass
class _RoundState:
    """What the server keeps between one secure round's exchanges (never beyond the round)."""

    server_round: int
    #: node -> its neighbours; node -> shares needed to rebuild its secrets.
    graph: dict[int, list[int]]
    thresholds: dict[int, int]
    result: SecureSum
    #: ``exchange(contents, stage) -> replies by node`` (SecAggPlus._exchange on the grid).
    exchange: Callable[[Mapping[int, RecordDict], str], dict[int, Message]]
    #: node -> (encryption, mask) public keys, from setup.
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    #: node -> its key holders (neighbours that advertised keys, and itself).
    holders: dict[int, list[int]] = field(default_factory=dict)
    #: node -> SHA-256 of its self-mask seed, for every node that shared its keys.
    commitments: dict[int, bytes] = field(default_factory=dict)
    #: (from, to) -> an encrypted share.
    ciphertexts: dict[tuple[int, int], bytes] = field(default_factory=dict)
    #: node -> the key holders it masks with (those that shared their keys).
    peers: dict[int, list[int]] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    seed_shares: dict[int, list[bytes]] = field(default_factory=dict)
    key_shares: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def survivors(self) -> list[int]:
        """Nodes whose masked vector arrived."""
        return sorted(self.masked)

    @property
    def dropped(self) -> list[int]:
        """Nodes that shared their keys but sent no (valid) masked vector."""
        return sorted(set(self.commitments) - set(self.masked))


class SecAggPlus:
    """Runs the four SecAgg+ exchanges of a round and unmasks the sum.

    Parameters
    ----------
    parameters : SecAggParameters
        Threshold, neighbours, quantisation and modulus (:mod:`secagg.parameters`).
    """

    def __init__(self, parameters: SecAggParameters) -> None:
        self.parameters = parameters
        self.last: SecureSum | None = None

    def summary(self) -> None:
        """Log the protocol's settings."""
        p = self.parameters
        log(
            INFO,
            "Secure aggregation (SecAgg+): threshold %.2f of each neighbourhood, %s, "
            "%d-bit quantisation in Z_2^%d",
            p.threshold,
            "every pair masks" if p.neighbours == 0 else f"{p.neighbours} neighbours",
            p.quantization_bits,
            p.modulus_bits,
        )

    # ------------------------------------------------------------------ exchange
    def _exchange(
        self,
        grid: Grid,
        contents: Mapping[int, RecordDict],
        timeout: float,
        result: SecureSum,
        stage: str,
    ) -> dict[int, Message]:
        """Send one stage's messages; the replies by node (missing ones go to failures)."""
        messages = {
            node: Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            for node, content in contents.items()
        }
        for node, content in contents.items():
            result.bytes_to_clients[node] = result.bytes_to_clients.get(node, 0) + content_bytes(
                content
            )
        replies = grid.send_and_receive(list(messages.values()), timeout=timeout)
        by_id = {
            m.metadata.message_id: node for node, m in messages.items() if m.metadata.message_id
        }
        answered: dict[int, Message] = {}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in messages or node in answered:
                continue
            answered[node] = reply
            if reply.has_content():
                result.bytes_from_clients[node] = result.bytes_from_clients.get(
                    node, 0
                ) + content_bytes(reply.content)
        for node in messages:
            if node not in answered:
                result.failures[node] = f"{stage}: no reply before the timeout"
        return answered

    @staticmethod
    def _reject(result: SecureSum, node: int, stage: str, reason: Exception | str) -> None:
        result.failures[node] = f"{stage}: {reason}"

    # --------------------------------------------------------------------- round
    def run(
        self,
        grid: Grid,
        server_round: int,
        train_content: RecordDict,
        nodes: Sequence[int],
        spec: VectorSpec,
        vector_length: int,
        timeout: float,
        min_survivors: int = 0,
    ) -> SecureSum:
        """One secure round over ``nodes``; the collect stage carries ``train_content``.

        ``train_content`` is the round's train message content (global arrays
        and train config); ``spec`` says how clients encode their vectors of
        ``vector_length`` coordinates. Fewer masked inputs than the threshold
        or than ``min_survivors`` (distributed noise: the clients whose noise
        the accounting counts on) void the round.
        """
        t_start = time.monotonic()
        result = SecureSum(None, [])
        if len(nodes) < 2:
            # The sum of one client's vector is that vector.
            return self._void(result, server_round, t_start,
                              f"{len(nodes)} client(s) sampled; a secure sum needs at least 2")
        graph = neighbour_graph(nodes, self.parameters.neighbours, secure_generator())
        state = _RoundState(
            server_round=server_round,
            graph=graph,
            thresholds={n: self.parameters.threshold_of(len(graph[n]) + 1) for n in nodes},
            result=result,
            exchange=lambda contents, stage: self._exchange(grid, contents, timeout, result, stage),
        )
        result.threshold = max(min(state.thresholds.values()), min_survivors)
        self._advertise_keys(state)
        self._share_keys(state)
        self._collect_masked(state, train_content, spec, vector_length)
        if len(state.masked) < result.threshold:
            return self._void(
                result, server_round, t_start,
                f"{len(state.masked)} masked inputs, fewer than the threshold {result.threshold}",
            )
        self._unmask(state)
        reason = self._unmasked_sum(state, vector_length)
        if reason is not None:
            return self._void(result, server_round, t_start, reason)
        self.last = result
        log(
            INFO,
            "Round %d secure aggregation: %d of %d sampled in the sum (%s), "
            "%d dropped after sharing keys, %.2f s",
            server_round,
            len(result.contributors),
            len(nodes),
            ", ".join(f"{stage} {count}" for stage, count in result.stage_counts.items()),
            len(state.dropped),
            time.monotonic() - t_start,
        )
        return result

    def _config(self, state: _RoundState, stage: str) -> ConfigRecord:
        return ConfigRecord(
            {protocol.SERVER_ROUND: state.server_round, protocol.SECAGG_STAGE: stage}
        )

    def _advertise_keys(self, state: _RoundState) -> None:
        """Stage 1, setup: neighbours and threshold out, two fresh public keys back."""
        contents = {}
        for node, neighbours in state.graph.items():
            config = self._config(state, protocol.SECAGG_SETUP)
            config[protocol.SECAGG_NEIGHBOURS] = list(neighbours)
            config[protocol.SECAGG_THRESHOLD] = state.thresholds[node]
            contents[node] = RecordDict({protocol.CONFIG: config})
        seen: set[bytes] = set()
        for node, reply in state.exchange(contents, "setup").items():
            try:
                record = _record(reply)
                pk_enc = record.get(protocol.SECAGG_PK_ENCRYPTION)
                pk_mask = record.get(protocol.SECAGG_PK_MASK)
                if not isinstance(pk_enc, bytes) or not isinstance(pk_mask, bytes):
                    raise InvalidReply("public keys must be bytes")
                keys.load_public_key(pk_enc)
                keys.load_public_key(pk_mask)
                if pk_enc in seen or pk_mask in seen or pk_enc == pk_mask:
                    raise InvalidReply("public key repeated")
                seen.update((pk_enc, pk_mask))
            except (InvalidReply, ValueError) as error:
                self._reject(state.result, node, "setup", error)
                continue
            state.public[node] = (pk_enc, pk_mask)
        state.result.stage_counts["setup"] = len(state.public)

    def _share_keys(self, state: _RoundState) -> None:
        """Stage 2, share-keys: holders' public keys out; encrypted shares, a commitment back."""
        public = state.public
        contents = {}
        for node in public:
            holders = sorted([v for v in state.graph[node] if v in public] + [node])
            state.holders[node] = holders
            if len(holders) < state.thresholds[node]:
                self._reject(state.result, node, "share-keys", "too few neighbours advertised keys")
                continue
            contents[node] = RecordDict({
                protocol.CONFIG: self._config(state, protocol.SECAGG_SHARE_KEYS),
                protocol.SECAGG_RECORD: ConfigRecord({
                    protocol.SECAGG_NODES: holders,
                    protocol.SECAGG_PK_ENCRYPTION: [public[v][0] for v in holders],
                    protocol.SECAGG_PK_MASK: [public[v][1] for v in holders],
                }),
            })
        for node, reply in state.exchange(contents, "share-keys").items():
            try:
                record = _record(reply)
                dsts = _int_list(record, protocol.SECAGG_NODES)
                texts = _bytes_list(record, protocol.SECAGG_CIPHERTEXTS)
                expected = [v for v in state.holders[node] if v != node]
                if sorted(dsts) != expected or len(texts) != len(dsts):
                    raise InvalidReply("shares must go to exactly the node's other key holders")
                if any(len(text) > _MAX_SHARE_BYTES for text in texts):
                    raise InvalidReply("share ciphertext too long")
                committed = record.get(protocol.SECAGG_SEED_COMMITMENT)
                if not isinstance(committed, bytes) or len(committed) != 32:
                    raise InvalidReply("a 32-byte seed commitment is required")
            except InvalidReply as error:
                self._reject(state.result, node, "share-keys", error)
                continue
            state.commitments[node] = committed
            for dst, text in zip(dsts, texts):
                state.ciphertexts[(node, dst)] = text
        state.result.stage_counts["share-keys"] = len(state.commitments)

    def _collect_masked(
        self, state: _RoundState, train_content: RecordDict, spec: VectorSpec, vector_length: int
    ) -> None:
        """Stage 3, collect-masked: model, train config and shares out; masked vectors back.

        Each node masks with the key holders whose shares it receives.
        """
        shared = state.commitments
        config = ConfigRecord(dict(train_content[protocol.CONFIG]))
        config.update(self._config(state, protocol.SECAGG_COLLECT))
        config.update({
            protocol.SECAGG_VECTOR_PREFIX + key.replace("_", "-"): value
            for key, value in spec.as_dict().items()
        })
        contents = {}
        for node in shared:
            peers = [v for v in state.holders[node] if v != node and v in shared]
            state.peers[node] = peers
            contents[node] = RecordDict({
                protocol.ARRAYS: train_content[protocol.ARRAYS],
                protocol.CONFIG: config,
                protocol.SECAGG_RECORD: ConfigRecord({
                    protocol.SECAGG_NODES: peers,
                    protocol.SECAGG_CIPHERTEXTS: [state.ciphertexts[(v, node)] for v in peers],
                }),
            })
        modulus_bits = self.parameters.modulus_bits
        wire = np.dtype(ring_dtype(modulus_bits))
        for node, reply in state.exchange(contents, "collect").items():
            try:
                if reply.has_error():
                    raise InvalidReply(f"error reply: {reply.error.reason}")
                record = reply.content.get(protocol.SECAGG_MASKED) if reply.has_content() else None
                if not isinstance(record, ArrayRecord) or list(record.keys()) != [
                    protocol.SECAGG_MASKED
                ]:
                    raise InvalidReply("the reply must hold one array named 'masked'")
                try:
                    vector = decode_array(record[protocol.SECAGG_MASKED])
                except ValueError as error:
                    raise InvalidReply(str(error)) from None
                if vector.dtype != wire or vector.shape != (vector_length,):
                    raise InvalidReply(
                        f"masked vector is {vector.dtype}{list(vector.shape)}, expected "
                        f"{wire}[{vector_length}]"
                    )
                if modulus_bits not in (32, 64) and int(vector.max(initial=0)) >> modulus_bits:
                    raise InvalidReply("masked vector holds values outside Z_M")
            except InvalidReply as error:
                self._reject(state.result, node, "collect", error)
                continue
            state.masked[node] = vector
        state.result.stage_counts["collect"] = len(state.masked)

    def _unmask(self, state: _RoundState) -> None:
        """Stage 4, unmask: per holder, the self-mask share (survived) or mask-key share (dropped)."""
        contents = {}
        for node in state.survivors:
            contents[node] = RecordDict({
                protocol.CONFIG: self._config(state, protocol.SECAGG_UNMASK),
                protocol.SECAGG_RECORD: ConfigRecord({
                    protocol.SECAGG_SURVIVORS: [
                        v for v in state.holders[node] if v in state.masked
                    ],
                    protocol.SECAGG_DROPPED: [v for v in state.peers[node]
                                              if v not in state.masked],
                }),
            })
        state.seed_shares = {node: [] for node in state.survivors}
        state.key_shares = {node: [] for node in state.dropped}
        answered = 0
        for node, reply in state.exchange(contents, "unmask").items():
            asked = contents[node][protocol.SECAGG_RECORD]
            try:
                record = _record(reply)
                seeds = _bytes_list(record, protocol.SECAGG_SEED_SHARES)
                key_shares = _bytes_list(record, protocol.SECAGG_KEY_SHARES)
                if len(seeds) != len(asked[protocol.SECAGG_SURVIVORS]) or len(key_shares) != len(
                    asked[protocol.SECAGG_DROPPED]
                ):
                    raise InvalidReply("one share per node asked for is required")
                if any(len(share) > _MAX_SHARE_BYTES for share in seeds + key_shares):
                    raise InvalidReply("share too long")
            except InvalidReply as error:
                self._reject(state.result, node, "unmask", error)
                continue
            answered += 1
            for v, share in zip(asked[protocol.SECAGG_SURVIVORS], seeds):
                state.seed_shares[v].append(share)
            for v, share in zip(asked[protocol.SECAGG_DROPPED], key_shares):
                state.key_shares[v].append(share)
        state.result.stage_counts["unmask"] = answered

    def _unmasked_sum(self, state: _RoundState, vector_length: int) -> str | None:
        """Rebuild the masks and take them off the sum (into ``state.result``); why not, or None."""
        modulus_bits = self.parameters.modulus_bits
        public, survivors = state.public, state.survivors
        total = np.zeros(vector_length, dtype=np.uint64)
        for vector in state.masked.values():
            total += vector.astype(np.uint64)
        secrets = self._rebuild(
            {("seed", v): (state.seed_shares[v], state.thresholds[v]) for v in survivors}
            | {("key", v): (state.key_shares[v], state.thresholds[v]) for v in state.dropped}
        )
        for node in survivors:
            seed = secrets[("seed", node)]
            if isinstance(seed, bytes) and keys.commitment(seed) != state.commitments[node]:
                seed = ValueError("rebuilt seed does not match its commitment (a bad share)")
            if isinstance(seed, ValueError):
                return f"self mask of node {node} cannot be rebuilt: {seed}"
            total -= prg_mask(seed, vector_length, modulus_bits)
        for node in state.dropped:
            try:
                rebuilt = secrets[("key", node)]
                if isinstance(rebuilt, ValueError):
                    raise rebuilt
                private = keys.private_key_from_bytes(rebuilt)
                if keys.public_key_to_bytes(private.public_key()) != public[node][1]:
                    raise ValueError("rebuilt key does not match the advertised one")
            except ValueError as error:
                return f"pair masks of dropped node {node} cannot be rebuilt: {error}"
            for survivor in survivors:
                if node not in state.peers[survivor]:
                    continue
                seed = keys.mask_seed(private, keys.load_public_key(public[survivor][1]))
                mask = prg_mask(seed, vector_length, modulus_bits)
                # The survivor added sign(survivor, node) * PRG(s); take it off.
                if mask_sign(survivor, node) > 0:
                    total -= mask
                else:
                    total += mask
        state.result.total = from_ring(reduce(total, modulus_bits), modulus_bits)
        state.result.contributors = survivors
        return None

    @staticmethod
    def _rebuild(
        wanted: Mapping[tuple[str, int], tuple[list[bytes], int]],
    ) -> dict[tuple[str, int], bytes | ValueError]:
        """Every secret from its first ``t`` shares by index (one batch), or why it cannot be.

        Taking the lowest indices makes most secrets share one index set, whose
        interpolation weights :func:`secagg.shamir.combine_shares_batch` computes once.
        """
        out: dict[tuple[str, int], bytes | ValueError] = {}
        batch: dict[tuple[str, int], list[bytes]] = {}
        for name, (shares, threshold) in wanted.items():
            if len(shares) < threshold:
                out[name] = ValueError(f"{len(shares)} shares back, {threshold} needed")
            elif len({share[:4] for share in shares}) != len(shares):
                out[name] = ValueError("two shares carry the same index")
            else:
                batch[name] = sorted(shares, key=lambda share: share[:4][::-1])[:threshold]
        try:
            out.update(zip(batch, keys.combine_shares_batch(list(batch.values()))))
        except ValueError:  # find which: one at a time
            for name, shares in batch.items():
                try:
                    out[name] = keys.combine_shares_batch([shares])[0]
                except ValueError as error:
                    out[name] = error
        return out

    def _void(self, result: SecureSum, server_round: int, t_start: float, reason: str) -> SecureSum:
        result.voided = reason
        result.total = None
        self.last = result
        log(
            WARNING,
            "Round %d voided by secure aggregation: %s; the model stays unchanged (%.2f s)",
            server_round,
            reason,
            time.monotonic() - t_start,
        )
        return result


def secure_round_metrics(result: SecureSum) -> dict[str, float]:
    """The round's public secure-aggregation figures (``metrics.json``)."""
    figures: dict[str, float] = {
        "secagg-voided": float(result.voided is not None),
        "secagg-threshold": float(result.threshold),
        "secagg-contributors": float(len(result.contributors)),
    }
    for stage, count in result.stage_counts.items():
        figures[f"secagg-{stage}"] = float(count)
    if result.bytes_from_clients:
        figures["secagg-bytes-per-client"] = float(
            np.mean(list(result.bytes_from_clients.values()))
        )
    return figures

