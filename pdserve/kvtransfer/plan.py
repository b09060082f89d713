"""Send plans: the schedule of bulk messages a sender announces before it sends the first byte of them.

Why: with one header per message the receiver had to wake up per message (pop the header from the
store, post the receive, wait, scatter), and the link idled during each of those round trips. A plan
announces a run of messages at once, so the receiver posts every receive of the run in one go and the
sender's messages flow back to back; the receiver's host is no longer on the data path.

A plan is a list of :class:`PlannedMessage`. Each message carries one or more *parts*; a part is one
layer of one transfer over a block range (a LAYER :class:`~pdserve.kvtransfer.messages.Header`). A
message's bytes are its parts' payloads (``[2, n, block_size, heads, dim]`` each) back to back. A
*split* message has exactly one part and goes out as two sends, keys then values, so a receiver whose
destination blocks are contiguous receives them straight into its cache (each half is one contiguous
range of a layer tensor); otherwise the receiver stages the bytes and scatters them.

Wire form: a ``PLAN`` header with ``num_messages`` = number of messages, ``payload_nbytes`` = total
bytes, and ``ints`` = per message ``[num_parts, flags]`` (bit 0: split; bit 1: joins the previous
message's coalesced launch) followed by ``PART_INTS`` ints per part (transfer_id, layer, start,
num_blocks, payload_nbytes).

Launches (:func:`coalesce_ready`, :func:`launches`): on NCCL, consecutive messages whose layers are all
computed when the plan is made go out in one coalesced launch (one host-side operation for several
messages, :mod:`pdserve.kvtransfer.coalescing`), and the receiver posts their receives in the same
grouping, which the plan states because NCCL needs both sides to group alike.

Grouping (:func:`group_parts`): consecutive parts go into one message until it holds at least
``min_message_bytes`` (small layers of short prompts are grouped, since small NCCL messages are slow),
never splitting one layer's parts over two messages unless the message would pass ``max_message_bytes``;
parts whose layers are already computed when the plan is made are merged up to ``max_message_bytes``
(a backlog goes out in few large messages; layers still being computed go one by one, overlapping the
forward pass). Per NCCL operation there is a fixed host and link cost, which is why a split message
(two operations) pays off only for large parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.messages import Header, MessageKind, ProtocolError

PART_INTS = 5  # transfer_id, layer, start, num_blocks, payload_nbytes


@dataclass(frozen=True)
class PlannedMessage:
    """One bulk message of a plan: its parts in payload order, and whether it is sent as K then V."""

    parts: tuple[Header, ...]
    split: bool = False
    #: Sent in one coalesced launch with the message before it (both sides group exactly these sets:
    #: NCCL hangs when one side coalesces operations the other posts one by one).
    joins_previous: bool = False

    @property
    def nbytes(self) -> int:
        return sum(p.payload_nbytes for p in self.parts)

    def send_sizes(self) -> tuple[int, ...]:
        """The byte counts of the sends (and so of the matching receives) that carry this message."""
        total = self.nbytes
        return (total // 2, total // 2) if self.split else (total,)


def encode_plan(messages: Sequence[PlannedMessage]) -> Header:
    """The PLAN header announcing ``messages``."""
    ints: list[int] = []
    for message in messages:
        ints += [len(message.parts), int(message.split) | int(message.joins_previous) << 1]
        for p in message.parts:
            ints += [p.transfer_id, p.layer, p.start, p.num_blocks, p.payload_nbytes]
    return Header(MessageKind.PLAN, num_messages=len(messages),
                  payload_nbytes=sum(m.nbytes for m in messages), ints=tuple(ints))


def decode_plan(header: Header) -> list[PlannedMessage]:
    """The messages a PLAN header announces; :class:`ProtocolError` if it is malformed."""
    ints, pos = header.ints, 0
    messages: list[PlannedMessage] = []
    for _ in range(header.num_messages):
        if pos + 2 > len(ints):
            raise ProtocolError("a PLAN header ends inside a message descriptor")
        num_parts, flags = ints[pos], ints[pos + 1]
        pos += 2
        if num_parts <= 0 or pos + PART_INTS * num_parts > len(ints) or flags not in (0, 1, 2, 3):
            raise ProtocolError(f"a PLAN message descriptor is malformed (parts={num_parts}, flags={flags})")
        if flags & 2 and not messages:
            raise ProtocolError("the first message of a PLAN cannot join a previous one")
        parts = []
        for _ in range(num_parts):
            tid, layer, start, num_blocks, nbytes = ints[pos:pos + PART_INTS]
            pos += PART_INTS
            if nbytes <= 0:
                raise ProtocolError(f"a PLAN part has {nbytes} bytes")
            parts.append(Header(MessageKind.LAYER, tid, layer, start, num_blocks, nbytes))
        message = PlannedMessage(tuple(parts), bool(flags & 1), bool(flags & 2))
        if message.split and (num_parts != 1 or message.nbytes % 2):
            raise ProtocolError("a split PLAN message must have one part of an even size")
        messages.append(message)
    if pos != len(ints):
        raise ProtocolError(f"a PLAN header carries {len(ints) - pos} ints more than its messages")
    if sum(m.nbytes for m in messages) != header.payload_nbytes:
        raise ProtocolError("a PLAN header's messages do not add up to its payload size")
    return messages


def group_parts(parts: Sequence[Header], splittable: Callable[[int], bool], min_message_bytes: int,
                max_message_bytes: int, ready: Sequence[bool] | None = None) -> list[PlannedMessage]:
    """Group ``parts`` (in send order) into messages; ``splittable(i)`` says whether part ``i`` may go
    as a split message when it ends up alone; ``ready[i]`` whether its layer is computed already."""
    groups: list[list[int]] = []
    nbytes, all_ready = 0, False
    for i, part in enumerate(parts):
        current = groups[-1] if groups else None
        is_ready = bool(ready[i]) if ready is not None else False
        if current is not None:
            same_layer = parts[current[-1]].layer == part.layer
            room = nbytes + part.payload_nbytes <= max_message_bytes
            if room and (same_layer or nbytes < min_message_bytes or (all_ready and is_ready)):
                current.append(i)
                nbytes += part.payload_nbytes
                all_ready = all_ready and is_ready
                continue
        groups.append([i])
        nbytes, all_ready = part.payload_nbytes, is_ready
    return [PlannedMessage(tuple(parts[i] for i in g), split=len(g) == 1 and splittable(g[0])) for g in groups]


def is_contiguous(ids: Sequence[int]) -> bool:
    """Whether block ids are consecutive and increasing (one range of a layer tensor)."""
    return all(b == ids[0] + i for i, b in enumerate(ids))


def part_payloads(message: PlannedMessage, buffer: torch.Tensor,
                  layout: KVLayoutInfo) -> Iterator[tuple[Header, torch.Tensor]]:
    """Each part of ``message`` with its payload: a ``[2, n, block_size, heads, dim]`` view into the
    message's ``uint8`` ``buffer`` (the raw bytes when a part's size does not fit the layout: the
    receiver's checks then refuse it)."""
    offset = 0
    for part in message.parts:
        chunk = buffer[offset:offset + part.payload_nbytes]
        offset += part.payload_nbytes
        fits = part.num_blocks > 0 and part.payload_nbytes == layout.payload_nbytes(part.num_blocks)
        yield part, (chunk.view(layout.torch_dtype).view(layout.payload_shape(part.num_blocks)) if fits else chunk)


def message_buffers(message: PlannedMessage, device: torch.device | str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A staging buffer for ``message`` and the views its sends fill (keys then values when split)."""
    staged = torch.empty(message.nbytes, dtype=torch.uint8, device=device)
    half = message.nbytes // 2
    return staged, [staged[:half], staged[half:]] if message.split else [staged]


def coalesce_ready(messages: Sequence[PlannedMessage], ready: Sequence[bool], max_bytes: int) -> list[PlannedMessage]:
    """``messages`` with ``joins_previous`` set on each ready message that follows a ready one, while
    the launch it joins stays within ``max_bytes`` (``ready[i]``: message ``i``'s layers are computed)."""
    out: list[PlannedMessage] = []
    launch_bytes = 0
    for i, message in enumerate(messages):
        joins = bool(out) and ready[i] and ready[i - 1] and launch_bytes + message.nbytes <= max_bytes
        launch_bytes = launch_bytes + message.nbytes if joins else message.nbytes
        out.append(PlannedMessage(message.parts, message.split, joins))
    return out


def launches(messages: Sequence[PlannedMessage]) -> Iterator[list[int]]:
    """The indices of ``messages`` in launch order, one list per launch (a message and those joining it)."""
    batch: list[int] = []
    for i, message in enumerate(messages):
        if batch and not message.joins_previous:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
