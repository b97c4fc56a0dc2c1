"""Debian version ordering (Debian Policy 5.6.12), to pick the newest of several suites."""
from __future__ import annotations

import functools
import re


def _order(c: str) -> int:
    # '~' sorts before everything, even the end of the string; letters before other characters.
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        # Non-digit run.
        na = re.match(r"\D*", a[i:]).group()
        nb = re.match(r"\D*", b[j:]).group()
        for k in range(max(len(na), len(nb))):
            ca = _order(na[k]) if k < len(na) else 0
            cb = _order(nb[k]) if k < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        i += len(na)
        j += len(nb)
        # Digit run.
        da = re.match(r"\d*", a[i:]).group()
        db = re.match(r"\d*", b[j:]).group()
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        i += len(da)
        j += len(db)
    return 0


def _split(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.partition(":")
    if not sep:
        epoch, rest = "0", version
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, equal to or after `b`."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


sort_key = functools.cmp_to_key(compare)
