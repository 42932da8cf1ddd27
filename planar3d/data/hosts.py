"""Which real host scan a (synthetic) case was made from, and a warning when validation shares one.

Why: cases made by injecting lesions into one real FLAIR share its anatomy, contrast and
artefacts. When validation cases come from a host that training cases also come from, a network
that over-segments every bright structure of that head still scores well, and the threshold
chosen on validation is too low for new patients (issue 9: validation picked 0.1, the lowest in
the grid). The warning tells the user the validation score is not a generalisation score.

How a case knows its host: the manifest ``group`` written by ``planar3d synth``.

* lesion-injected cases: ``group`` starts with ``"host-"`` (``host-<axcodes>`` today,
  ``host-<host file stem>-<axcodes>`` once synth records the host's name); an optional
  ``-brain`` suffix (the skull-stripped variant of the same host) is ignored. The host key is
  the rest of the group, so cases of one host share a key whether skull-stripped or not.
* phantoms (``group`` like ``3d-RAS``) are independent random draws, and real data sets' groups
  are acquisition centres of *different* patients: neither has a host (key ``None``).

With today's ``host-<axcodes>`` groups two different hosts with the same orientation share a
key: the warning can then fire for cases of different heads (conservative: it never misses a
shared host), which is why synth should record the host's name.

Example:
    >>> from pathlib import Path
    >>> from planar3d.data.manifest import Case
    >>> a = Case("a", Path("a.nii.gz"), group="host-flair_head_1mm-RAS")
    >>> b = Case("b", Path("b.nii.gz"), group="host-flair_head_1mm-RAS-brain")
    >>> host_key(a) == host_key(b) == "flair_head_1mm-RAS"
    True
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from planar3d.data.manifest import Case

HOST_PREFIX = "host-"
BRAIN_SUFFIX = "-brain"


def host_key(case: Case) -> Optional[str]:
    """The host scan a case was made from (see module docstring), or ``None``."""
    group = case.group or ""
    if not group.startswith(HOST_PREFIX):
        return None
    key = group[len(HOST_PREFIX):]
    if key.endswith(BRAIN_SUFFIX):
        key = key[: -len(BRAIN_SUFFIX)]
    return key or None


def shared_hosts(train_cases: Sequence[Case], val_cases: Sequence[Case]) -> Dict[str, List[str]]:
    """``{host key: [validation case ids]}`` for validation cases whose host also makes training cases."""
    train_hosts = {host_key(c) for c in train_cases} - {None}
    out: Dict[str, List[str]] = {}
    for case in val_cases:
        key = host_key(case)
        if key in train_hosts:
            out.setdefault(key, []).append(case.id)  # type: ignore[arg-type]
    return out


def shared_host_warning(train_cases: Sequence[Case], val_cases: Sequence[Case]) -> Optional[str]:
    """A one-line warning when validation cases share a host scan with training cases, else ``None``."""
    shared = shared_hosts(train_cases, val_cases)
    if not shared:
        return None
    count = sum(len(ids) for ids in shared.values())
    hosts = ", ".join(f"{key} ({', '.join(ids)})" for key, ids in sorted(shared.items()))
    return (f"{count} of {len(val_cases)} validation case(s) share a host scan with training cases: {hosts}; "
            "validation rewards what fits that head, not new patients (hold out a whole host instead)")
