"""Micro-benchmark of signing sealed messages: the encryptor's sign and the store-writer's
parse + verify per message, in microseconds; and the extra SHA-256 over the sealed body
(per MiB) the encryptor now computes while sealing.

Run under the shared lock: ``flock /tmp/dicomflow-bench.lock .venv/bin/python bench/sealsign.py``
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dicomflow.shared.contracts import messages
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.sealsign import (
    generate_signing_key_pair,
    load_signing_key,
    load_trusted_keys,
)


def _best_of(rounds: int, n: int, work: Callable[[], object]) -> float:
    """Microseconds per call: the best of ``rounds`` rounds of ``n`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            work()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best counts (5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        private, public = generate_signing_key_pair(Path(folder))
        signer = load_signing_key(private, "encryption.signing_key")
        verifier = load_trusted_keys([public], "encryption.trusted_signing_keys")
    instance = Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.12345678901234567890",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid="1.2.826.0.1.3680043.8.498.2",
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=524_288,
        sha256="ab" * 32,
        modality="CT",
    ).sealed(1, 524_288 + 86, "cd" * 32)
    signed = signer.sign(instance)
    headers = signed.headers()

    def receive() -> None:
        verifier.verify(messages.parse(headers, sealed=True, signed=True))

    sign_us = _best_of(args.rounds, args.n, lambda: signer.sign(instance))
    verify_us = _best_of(args.rounds, args.n, lambda: verifier.verify(signed))
    receive_us = _best_of(args.rounds, args.n, receive)
    mib = bytes(1024 * 1024)
    sha_us = _best_of(args.rounds, 50, lambda: hashlib.sha256(mib).digest())
    print(f"sign (encryptor)                 {sign_us:8.1f} us/message")
    print(f"verify (store-writer)            {verify_us:8.1f} us/message")
    print(f"sign + verify                    {sign_us + verify_us:8.1f} us/message")
    print(f"parse + verify (store-writer)    {receive_us:8.1f} us/message")
    print(f"SHA-256 of the sealed body       {sha_us:8.1f} us/MiB")


if __name__ == "__main__":
    main()
