"""`dicomflow dlq ls`, `replay` and `purge`: the dead-letter stream.

A dead letter is on ``dicomflow.dlq.<stage>``, the subject of the stage that wrote it.
It keeps the message's headers and body, plus the stage, the subject it came from, how
many deliveries it had and the reason (with the DICOM status for a refused delivery).
The encryptor keeps no plaintext there: it dead-letters the instance sealed and signed
(``Dicomflow-Dlq-Body: sealed``), or headers only (``dropped``) when it cannot.

Replay trusts no header for where a letter goes. The stage comes from the subject the
letter is on, and the target subject from that stage and the letter's headers once
they pass the contract of the stream the stage consumes (``_target``): the body is
checked too (an inline body's size and SHA-256, a sealed body's A1 prefix). A letter
that does not pass is refused, named by its sequence, and left in the DLQ. A replayed
letter is deleted from the DLQ once republished; a replay interrupted in between is
de-duplicated by its message id when run again within the duplicate window.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dicomflow.cli.options import add_settings_options, settings_from
from dicomflow.cli.send import check_destination
from dicomflow.scu_gateway.settings import ScuGatewaySettings
from dicomflow.shared.contracts import deliveries, messages, subjects
from dicomflow.shared.contracts.deadletters import (
    BODY_SEALED,
    H_DLQ_BODY,
    H_DLQ_DELIVERIES,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    without_dlq_headers,
)
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.errors import ConfigError, DicomflowError
from dicomflow.shared.nats import blobsweeper, natsconn
from dicomflow.shared.nats.errormap import nats_errors

# The stages that dead-letter, by the stream they consume (their names in the services).
ENCRYPTOR = "encryptor"  # INGEST
SEALED_STAGES = ("store-writer", "scu-relay")  # SEALED
ROUTER = "scu-router"  # EVENTS
DELIVER = "deliver-"  # DELIVERY, one stage per destination: deliver-<token>


class LetterRefused(DicomflowError):
    """A dead letter that replay will not republish."""


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    subject: str  # the dicomflow.dlq.<stage> subject it is on
    headers: dict[str, str]
    data: bytes

    @property
    def stage(self) -> str:
        """The stage whose dead-letter subject this is ("" for any other subject):
        ``dicomflow.dlq.<stage>``, or ``dicomflow.dlq.deliver.<dest>`` for the delivery
        stage ``deliver-<dest>`` (letters of earlier versions sit on the stage's name)."""
        deliver = f"{subjects.DLQ_DELIVER_PREFIX}."
        if self.subject.startswith(deliver):
            return f"{DELIVER}{self.subject[len(deliver) :]}"
        prefix = f"{subjects.DLQ_PREFIX}."
        return self.subject[len(prefix) :] if self.subject.startswith(prefix) else ""

    def summary(self) -> dict[str, str | int]:
        h = self.headers
        return {
            "seq": self.seq,
            "stage": self.stage,
            "subject": h.get(H_DLQ_SUBJECT, ""),
            "deliveries": int(h.get(H_DLQ_DELIVERIES, "0") or 0),
            "sop_instance_uid": h.get(messages.H_SOP_INSTANCE, ""),
            "destination": h.get(deliveries.H_DESTINATION, ""),
            "body": h.get(H_DLQ_BODY, "as received"),
            "reason": h.get(H_DLQ_REASON, ""),
        }


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="list, replay and purge dead-lettered messages",
        description="Inspect, replay and purge the dead-letter stream (DICOMFLOW_DLQ).",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="DLQ_COMMAND", required=True)
    ls = dlq_sub.add_parser(
        "ls",
        help="list dead-lettered messages",
        description="One line per dead-lettered message: sequence, stage, reason.",
    )
    add_settings_options(ls)
    ls.add_argument("--json", action="store_true", help="a JSON array ([] when empty)")
    ls.set_defaults(func=lambda a: asyncio.run(_ls(a)))

    replay = dlq_sub.add_parser(
        "replay",
        help="republish dead-lettered messages, then remove them from the DLQ",
        description=(
            "Republish the dead-lettered messages SEQ (all when none is given) onto the "
            "subject their stage and validated headers give, or, with --to DEST, a "
            "dead-lettered delivery onto DEST's delivery subject; each is deleted from "
            "the DLQ once republished. A letter that fails validation is named and left "
            "in the DLQ (exit code 1)."
        ),
    )
    add_settings_options(replay)
    replay.add_argument("--to", metavar="DEST", help="deliver to this destination instead")
    replay.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="DLQ sequence numbers")
    replay.set_defaults(func=lambda a: asyncio.run(_replay(a)))

    purge = dlq_sub.add_parser(
        "purge",
        help="remove dead-lettered messages for good",
        description=(
            "Remove the dead letters SEQ, or every one (--all), after confirmation (type "
            "yes; --yes skips the question, and is needed without a terminal), then "
            "sweep the blobs no message names any more."
        ),
    )
    add_settings_options(purge)
    purge.add_argument("--all", action="store_true", help="every dead letter")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="DLQ sequence numbers")
    purge.set_defaults(func=lambda a: asyncio.run(_purge(a)))


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
        yield DeadLetter(seq, msg.subject or "", dict(msg.headers or {}), msg.data or b"")


async def _ls(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScuGatewaySettings)
    nc = await natsconn.connect_once(settings.nats, "cli")
    rows = []
    try:
        async for letter in dead_letters(nc.jetstream()):
            row = letter.summary()
            rows.append(row)
            if not args.json:
                print(
                    f"{row['seq']:>6}  {row['stage']}  {row['sop_instance_uid'] or '-'}  "
                    f"deliveries {row['deliveries']}  {row['reason']}"
                )
    finally:
        await nc.close()
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{len(rows)} dead-lettered message(s)", file=sys.stderr)
    return 0


def _target(letter: DeadLetter, to: str | None) -> tuple[str, dict[str, str]]:
    """Where ``letter`` is republished, and with which headers: from the stage its
    subject names and the contract of that stage's stream, never from a header.
    Raises LetterRefused."""
    headers = without_dlq_headers(letter.headers)  # a replayed message is no dead letter
    headers[messages.H_MSG_ID] = f"replay:{letter.seq}"
    stage = letter.stage
    try:
        if to is not None or stage.startswith(DELIVER):
            return _delivery(letter, stage, to, headers)
        if stage == ENCRYPTOR:
            return _from_encryptor(letter), headers
        if stage in SEALED_STAGES:
            return _sealed(letter), headers
        if stage == ROUTER:
            return _event(letter), headers
    except DicomflowError as exc:  # LetterRefused, or the contract's ContractViolation
        raise LetterRefused(f"dead letter {letter.seq} ({stage}): {exc}") from exc
    raise LetterRefused(
        f"dead letter {letter.seq} is on {letter.subject}, which no dicomflow stage dead-letters to"
    )


def _from_encryptor(letter: DeadLetter) -> str:
    kept = letter.headers.get(H_DLQ_BODY, "")
    if kept == BODY_SEALED:  # sealed and signed by the encryptor: onto SEALED
        return _sealed(letter)
    if kept:
        raise LetterRefused(
            f"its body was not kept ({kept}; the reason says why): there is nothing to "
            "replay; purge it and have the instance sent again"
        )
    # Dead-lettered as received, by an earlier dicomflow: plaintext onto INGEST.
    instance = messages.decode_ingest(letter.headers, letter.data)
    _check_digest(instance, letter.data, instance.sha256)
    return subjects.ingest_subject(instance.called_ae, instance.calling_ae)


def _sealed(letter: DeadLetter) -> str:
    instance = messages.decode_sealed(letter.headers, letter.data)
    _check_digest(instance, letter.data, instance.sealed_sha256)
    return subjects.sealed_subject(instance.called_ae, instance.calling_ae)


def _event(letter: DeadLetter) -> str:
    instance = messages.parse(letter.headers, sealed=True)
    deliveries.object_key_of(letter.headers)
    if letter.data:
        raise LetterRefused("a dicom.stored event has no body")
    return subjects.stored_subject(instance.called_ae, instance.calling_ae)


def _delivery(
    letter: DeadLetter, stage: str, to: str | None, headers: dict[str, str]
) -> tuple[str, dict[str, str]]:
    if not stage.startswith(DELIVER):
        raise LetterRefused(f"it is not a delivery request ({stage}), so --to cannot apply")
    try:
        own = subjects.decode_token(stage[len(DELIVER) :])
    except (ValueError, UnicodeDecodeError):
        raise LetterRefused(f"{letter.subject} names no destination") from None
    req = deliveries.parse(letter.headers, destination=to or own)
    deliveries.check_body(req, letter.data)
    headers.update(req.headers())
    headers[messages.H_MSG_ID] = f"replay:{letter.seq}:{req.msg_id}"
    return subjects.deliver_subject(req.destination), headers


def _check_digest(instance: Instance, data: bytes, sha256: str) -> None:
    if instance.body is BodyKind.INLINE and hashlib.sha256(data).hexdigest() != sha256:
        raise LetterRefused("the inline body does not match the SHA-256 its headers give")


async def _replay(args: argparse.Namespace) -> int:
    settings = settings_from(args, ScuGatewaySettings)
    if args.to is not None:
        check_destination(settings.scu, args.to)
    nc = await natsconn.connect_once(settings.nats, "cli")
    count = refused = 0
    try:
        js = nc.jetstream()
        async for letter in dead_letters(js, args.seqs):
            try:
                subject, headers = _target(letter, args.to)
            except LetterRefused as exc:
                print(f"refused: {exc}; left in the DLQ", file=sys.stderr)
                refused += 1
                continue
            with nats_errors(f"replay of {letter.seq} failed"):
                await js.publish(
                    subject, letter.data, headers=headers, timeout=settings.nats.publish_timeout
                )
                await js.delete_msg(subjects.DLQ_STREAM, letter.seq)
            print(f"replayed {letter.seq} onto {subject}", file=sys.stderr)
            count += 1
    finally:
        await nc.close()
    print(f"{count} message(s) replayed, {refused} refused", file=sys.stderr)
    return 1 if refused else 0


async def _purge(args: argparse.Namespace) -> int:
    if bool(args.seqs) == bool(args.all):
        raise ConfigError("name the dead letters to purge (SEQ ...) or give --all, not both")
    settings = settings_from(args, ScuGatewaySettings)
    nc = await natsconn.connect_once(settings.nats, "cli")
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.DLQ_STREAM)
        if args.all:
            count, below = info.state.messages, info.state.last_seq + 1
        else:
            count, below = len({letter.seq async for letter in dead_letters(js, args.seqs)}), 0
        if not count:
            print("the DLQ is empty: nothing to purge", file=sys.stderr)
            return 0
        if not args.yes and not await _confirmed(count):
            print("nothing purged", file=sys.stderr)
            return 1
        with nats_errors("purge failed"):
            if args.all:  # only what was counted: letters arriving meanwhile stay
                await js.purge_stream(subjects.DLQ_STREAM, seq=below)
            else:
                for seq in sorted(set(args.seqs)):
                    await js.delete_msg(subjects.DLQ_STREAM, seq)
            blobs = await blobsweeper.sweep(js, settings.nats.blob_orphan_grace)
    finally:
        await nc.close()
    print(f"purged {count} dead letter(s); removed {blobs} orphaned blob(s)", file=sys.stderr)
    return 0


async def _confirmed(count: int) -> bool:
    """Whether the person at the terminal typed ``yes``; refuses without a terminal."""
    if not sys.stdin.isatty():
        raise ConfigError(
            f"refusing to purge {count} dead letter(s) without confirmation: there is no "
            "terminal to ask on; add --yes"
        )
    question = f"Remove {count} dead letter(s) from {subjects.DLQ_STREAM} for good? Type yes: "
    print(question, end="", file=sys.stderr, flush=True)
    answer: str = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip() == "yes"
