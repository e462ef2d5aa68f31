"""Routing rules: which destinations a stored instance goes to.

A rule matches when every one of its patterns matches the instance (shell-style
``fnmatch``; AE titles and Modality case-insensitively, UIDs exactly). An instance goes
to the union of the destinations of every matching rule, each once, in the order the
rules name them. Rules are checked when the settings load (unknown destinations, bad
UID patterns) and compiled here once.

Rules are evaluated in two places. A plain rule routes stored instances (``dicom.stored``
events). A ``relay`` rule routes an instance as soon as it is sealed, before storage: the
``scu-relay`` consumer reads SEALED (interest retention, so the store writer and the
relay each see every message) and queues a delivery request that carries the sealed
bytes, so the destination gets the instance without waiting for, or reading from,
object storage, and no plaintext leaves the scp-gateway/encryptor pair. A sealed body
too large to travel inline (a blob) is not relayed: its ``dicom.stored`` event says so
(``Dicomflow-Sealed-Body: blob``) and the relay rule routes it from storage instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from dicomflow.scu_gateway.settings import RuleSettings, ScuSettings
from dicomflow.shared.contracts.messages import Instance


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    destinations: tuple[str, ...]
    relay: bool
    called_ae: str
    calling_ae: str
    modality: str
    sop_class_uid: str
    study_uid: str
    series_uid: str

    @classmethod
    def of(cls, index: int, rule: RuleSettings) -> Rule:
        return cls(
            index=index,
            destinations=tuple(rule.destinations),
            relay=rule.relay,
            called_ae=rule.called_ae.upper(),
            calling_ae=rule.calling_ae.upper(),
            modality=rule.modality.upper(),
            sop_class_uid=rule.sop_class_uid,
            study_uid=rule.study_uid,
            series_uid=rule.series_uid,
        )

    def matches(self, instance: Instance) -> bool:
        return (
            fnmatchcase(instance.called_ae.upper(), self.called_ae)
            and fnmatchcase(instance.calling_ae.upper(), self.calling_ae)
            and fnmatchcase(instance.modality.upper(), self.modality)
            and fnmatchcase(instance.sop_class_uid, self.sop_class_uid)
            and fnmatchcase(instance.study_uid, self.study_uid)
            and fnmatchcase(instance.series_uid, self.series_uid)
        )


class Router:
    def __init__(self, rules: list[Rule]) -> None:
        self._rules = rules

    @classmethod
    def from_settings(cls, scu: ScuSettings) -> Router:
        return cls([Rule.of(i, rule) for i, rule in enumerate(scu.rules)])

    def __len__(self) -> int:
        return len(self._rules)

    @property
    def relays(self) -> bool:
        """Whether any rule routes before storage (a ``scu-relay`` consumer is needed)."""
        return any(rule.relay for rule in self._rules)

    def destinations(self, instance: Instance, *, relayed: bool = False) -> list[str]:
        """Where a stored instance goes: the plain rules' destinations, and the relay
        rules' too unless the instance was ``relayed`` before storage."""
        return self._union(instance, lambda rule: not (rule.relay and relayed))

    def relay_destinations(self, instance: Instance) -> list[str]:
        """Where a sealed instance is relayed before storage."""
        return self._union(instance, lambda rule: rule.relay)

    def _union(self, instance: Instance, applies: Callable[[Rule], bool]) -> list[str]:
        out: dict[str, None] = {}
        for rule in self._rules:
            if applies(rule) and rule.matches(instance):
                out.update(dict.fromkeys(rule.destinations))
        return list(out)
