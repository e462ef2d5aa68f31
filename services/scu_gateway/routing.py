"""Routing rules: which destinations a stored instance goes to.

A rule matches when every one of its patterns matches the instance (shell-style
``fnmatch``; AE titles and Modality case-insensitively, UIDs exactly). An instance goes
to the union of the destinations of every matching rule, each once, in the order the
rules name them. Rules are checked when the settings load (unknown destinations, bad
UID patterns) and compiled here once.

Rules are evaluated on stored instances (``dicom.stored`` events) only. Relay mode,
routing received instances before storage, is left out on purpose: INGEST is a
work-queue stream, so JetStream refuses a second consumer whose filter overlaps the
encryptor's, and a message is removed as soon as the encryptor acks it; a large body's
ingest blob is deleted right after that ack too. A relay consumer would need INGEST
with interest retention (plaintext then stays on the broker until the slowest consumer,
possibly an unreachable PACS, acks, and the encryptor may delete a blob only once both
did), or the scp-gateway publishing a second copy to a stream of its own (plaintext
kept twice). Both weaken INGEST's "plaintext only until sealed" property, so relay
waits for a design decision rather than a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from dicomflow.shared.messages import Instance
from dicomflow.shared.settings import RuleSettings, ScuSettings


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    destinations: tuple[str, ...]
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

    def destinations(self, instance: Instance) -> list[str]:
        out: dict[str, None] = {}
        for rule in self._rules:
            if rule.matches(instance):
                out.update(dict.fromkeys(rule.destinations))
        return list(out)
