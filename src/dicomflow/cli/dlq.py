"""`dicomflow dlq ls` and `dicomflow dlq replay`: the dead-letter stream.

A dead-lettered message keeps its original headers and body, plus the stage, the
subject it came from, how many deliveries it had and the reason (with the DICOM status
for a refused delivery). Replay republishes it, without the dead-letter headers, onto
its original subject, or for a delivery onto another destination's subject (``--to``),
and only then deletes it from the dead-letter stream; a replay interrupted in between
is de-duplicated by its message id when run again within the duplicate window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.cli.send import check_destination
from dicomflow.scu_gateway import request
from dicomflow.shared import messages, natsconn, subjects
from dicomflow.shared.consumer import (
    H_DLQ_DELIVERIES,
    H_DLQ_REASON,
    H_DLQ_STAGE,
    H_DLQ_STREAM_SEQ,
    H_DLQ_SUBJECT,
)
from dicomflow.shared.errors import BrokerUnavailable, ConfigError, DicomflowError
from dicomflow.shared.settings import ScuGatewaySettings

DLQ_HEADERS = (H_DLQ_REASON, H_DLQ_STAGE, H_DLQ_SUBJECT, H_DLQ_DELIVERIES, H_DLQ_STREAM_SEQ)


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    headers: dict[str, str]
    data: bytes

    @property
    def subject(self) -> str:
        return self.headers.get(H_DLQ_SUBJECT, "")

    def summary(self) -> dict[str, str | int]:
        h = self.headers
        return {
            "seq": self.seq,
            "stage": h.get(H_DLQ_STAGE, ""),
            "subject": self.subject,
            "deliveries": int(h.get(H_DLQ_DELIVERIES, "0") or 0),
            "sop_instance_uid": h.get(messages.H_SOP_INSTANCE, ""),
            "destination": h.get(request.H_DESTINATION, ""),
            "reason": h.get(H_DLQ_REASON, ""),
        }


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="list and replay dead-lettered messages",
        description="Inspect and replay the dead-letter stream (DICOMFLOW_DLQ).",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="DLQ_COMMAND", required=True)
    ls = dlq_sub.add_parser(
        "ls",
        help="list dead-lettered messages",
        description="One line per dead-lettered message: sequence, stage, reason.",
    )
    add_settings_options(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=lambda a: asyncio.run(_ls(a)))

    replay = dlq_sub.add_parser(
        "replay",
        help="republish dead-lettered messages, then remove them from the DLQ",
        description=(
            "Republish the dead-lettered messages SEQ (all when none is given) onto their "
            "original subject, or, with --to DEST, a dead-lettered delivery onto DEST's "
            "delivery subject; each is deleted from the DLQ once republished."
        ),
    )
    add_settings_options(replay)
    replay.add_argument("--to", metavar="DEST", help="deliver to this destination instead")
    replay.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="DLQ sequence numbers")
    replay.set_defaults(func=lambda a: asyncio.run(_replay(a)))


async def dead_letters(
    js: JetStreamContext, seqs: list[int] | None = None
) -> AsyncIterator[DeadLetter]:
    info = await js.stream_info(subjects.DLQ_STREAM)
    wanted = seqs if seqs else range(info.state.first_seq, info.state.last_seq + 1)
    if not seqs and info.state.messages == 0:
        return
    for seq in wanted:
        try:
            msg = await js.get_msg(subjects.DLQ_STREAM, seq)
        except NotFoundError:
            if seqs:
                raise ConfigError(f"no dead-lettered message with sequence {seq}") from None
            continue  # deleted (replayed) earlier
        yield DeadLetter(seq, dict(msg.headers or {}), msg.data or b"")


async def _ls(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScuGatewaySettings)
    nc = await natsconn.connect_once(settings.nats, "cli")
    count = 0
    try:
        async for letter in dead_letters(nc.jetstream()):
            row = letter.summary()
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"{row['seq']:>6}  {row['stage']}  {row['sop_instance_uid'] or '-'}  "
                    f"deliveries {row['deliveries']}  {row['reason']}"
                )
            count += 1
    finally:
        await nc.close()
    if not args.json:
        print(f"{count} dead-lettered message(s)", file=sys.stderr)
    return 0


def _target(letter: DeadLetter, to: str | None) -> tuple[str, dict[str, str]]:
    headers = {k: v for k, v in letter.headers.items() if k not in DLQ_HEADERS}
    headers[messages.H_MSG_ID] = f"replay:{letter.seq}"
    if to is None:
        if not letter.subject:
            raise DicomflowError(f"dead letter {letter.seq} does not name its original subject")
        return letter.subject, headers
    try:
        req = request.parse(letter.headers, destination=to)
    except DicomflowError as exc:
        raise ConfigError(
            f"dead letter {letter.seq} is not a delivery request, so --to cannot apply: {exc}"
        ) from exc
    headers.update(req.headers())
    headers[messages.H_MSG_ID] = f"replay:{letter.seq}:{req.msg_id}"
    return subjects.deliver_subject(to), headers


async def _replay(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScuGatewaySettings)
    if args.to is not None:
        check_destination(settings.scu, args.to)
    nc = await natsconn.connect_once(settings.nats, "cli")
    count = 0
    try:
        js = nc.jetstream()
        async for letter in dead_letters(js, args.seqs):
            subject, headers = _target(letter, args.to)
            try:
                await js.publish(
                    subject, letter.data, headers=headers, timeout=settings.nats.publish_timeout
                )
                await js.delete_msg(subjects.DLQ_STREAM, letter.seq)
            except (NatsError, TimeoutError) as exc:
                raise BrokerUnavailable(f"replay of {letter.seq} failed: {exc!r}") from exc
            print(f"replayed {letter.seq} onto {subject}", file=sys.stderr)
            count += 1
    finally:
        await nc.close()
    print(f"{count} message(s) replayed", file=sys.stderr)
    return 0
