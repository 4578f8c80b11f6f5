#!/usr/bin/env python3
"""Write the private apt source through which scripts/setup.sh fetches one package (containerd,
runsc, vhost-device-vsock) from another suite of the Debian archive this machine already uses.

Usage: debian_mirror.py SUITE OUT  (OUT: a deb822 .sources file; the machine's apt configuration is
only read).

The archive is the machine's apt source (/etc/apt/sources.list{,.d}) for this release
(os-release's VERSION_CODENAME; its -updates or -backports suites only when no entry names the
release itself) that is Debian's: a third-party repository such as Docker's also serves a suite named
after the release, often under a path ending in /debian. Where apt has fetched an entry's Release
file, its `Origin` decides. Where the lists are empty (a cleaned base image), an entry signed by the
Debian archive keyring (or by the machine's trusted keys) is taken first, one signed by another key
(an inline one) only at a Debian archive path and when there is no better one. The entry's URIs,
its key (a keyring path or an inline key block, kept as the multi-line field it is) and the options
a mirror may need (Check-Valid-Until: no for a snapshot, Trusted) are carried over.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# For an entry that names no key: debian-archive-keyring's file (.pgp in newer releases, .gpg before).
DEBIAN_KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.gpg", "/usr/share/keyrings/debian-archive-keyring.pgp")
DEBIAN_ORIGIN = "Debian"
# Options of an entry that the private source needs to reach the same archive, as deb822 fields
# (one-line sources spell them in lower case inside [ ]): a snapshot's Release files are past
# their Valid-Until, and a local mirror may be unsigned.
CARRIED_OPTIONS = ("Check-Valid-Until", "Trusted")
# Transports apt-get can fetch from unattended (not cdrom:).
FETCHABLE = ("http://", "https://", "file:", "mirror")
# An archive path of Debian's: ".../debian", or a snapshot of it ".../debian/20250520T000000Z".
DEBIAN_PATH = re.compile(r"/debian(/\d{8}T\d{6}Z)?/?$")


@dataclass
class Entry:
    uris: list[str]
    suites: list[str]
    signed_by: list[str]  # the field's lines: a keyring path or fingerprints, or an inline key block
    options: dict[str, str]  # CARRIED_OPTIONS found on the entry


def deb822_stanzas(text: str) -> Iterator[dict[str, list[str]]]:
    """Each stanza as field name (lower case) -> the field's lines (its first line's value, then its
    continuation lines): a multi-line field such as an inline key must stay multi-line."""
    stanza: dict[str, list[str]] = {}
    key = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t":
            if key:
                stanza[key].append(line.strip())
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = [value.strip()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _list_entries(text: str) -> Iterator[Entry]:
    """The `deb` lines of a one-line-style file (sources.list)."""
    for line in text.splitlines():
        m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line.split("#", 1)[0].strip())
        if not m:
            continue
        opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
        options = {name: opts[name.lower()] for name in CARRIED_OPTIONS if name.lower() in opts}
        signed_by = [opts["signed-by"]] if opts.get("signed-by") else []
        yield Entry([m.group(2)], [m.group(3)], signed_by, options)


def _deb822_entries(text: str) -> Iterator[Entry]:
    """The enabled `deb` stanzas of a deb822 file (*.sources)."""
    for st in deb822_stanzas(text):
        words = {key: " ".join(lines).split() for key, lines in st.items()}
        if words.get("enabled", ["yes"])[0].lower() == "no" or "deb" not in words.get("types", []):
            continue
        signed_by = st.get("signed-by", [])
        if signed_by and not signed_by[0]:  # "Signed-By:" with the key block on the next lines
            signed_by = signed_by[1:]
        options = {name: words[name.lower()][0] for name in CARRIED_OPTIONS if words.get(name.lower())}
        yield Entry(words.get("uris", []), words.get("suites", []), signed_by, options)


def parse_sources(root: Path = Path("/")) -> list[Entry]:
    """The enabled `deb` entries of the machine's apt sources, in apt's order: sources.list, then
    sources.list.d/ by file name."""
    apt = root / "etc/apt"
    parts = sorted(p for p in (apt / "sources.list.d").glob("*") if p.suffix in (".list", ".sources"))
    entries = []
    for path in [apt / "sources.list", *parts]:
        parse = _deb822_entries if path.suffix == ".sources" else _list_entries
        entries.extend(parse(_read(path) or ""))
    return entries


def release_codename(root: Path = Path("/")) -> str | None:
    for line in (_read(root / "etc/os-release") or "").splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip("\"'"):
            return value.strip("\"'")
    return None


def _norm(uri: str) -> str:
    # apt writes file:///x as file:/x and adds a trailing slash: compare both spellings alike.
    return re.sub(r":/+", ":/", uri, count=1).rstrip("/")


def apt_origins() -> dict[tuple[str, str], str]:
    """(archive URI, suite) -> the Origin of its Release file, for what apt has fetched."""
    try:
        out = subprocess.run(
            ["apt-get", "indextargets", "--release-info", "--format", "$(REPO_URI) $(RELEASE) $(ORIGIN)"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    origins = {}
    for line in out.splitlines():
        fields = line.split(" ", 2)
        # an index apt has not fetched yet keeps the placeholder "$(ORIGIN)"
        if len(fields) == 3 and fields[2] and not fields[2].startswith("$("):
            origins[(_norm(fields[0]), fields[1])] = fields[2]
    return origins


def _suite_rank(suites: list[str], codename: str | None) -> int | None:
    """0: the entry serves this release; 1: only another suite of it (-updates, -backports; never
    -security, a separate archive); None: not this release."""
    if codename is None:  # os-release names no release: any plain suite (stable, ...) of the old kind
        return 0 if any(re.fullmatch(r"[a-z]+", s) for s in suites) else None
    if codename in suites:
        return 0
    if any(s.startswith(codename + "-") and not s.endswith("-security") for s in suites):
        return 1
    return None


def _origin_rank(entry: Entry, origins: dict[tuple[str, str], str]) -> int | None:
    """0: its Release files say Debian. Not fetched yet: 1 when signed by the Debian archive keyring
    or by nothing (the machine's trusted keys), 2 when signed by another key (an inline one) but at a
    Debian archive path. None: not Debian's."""
    known = {origins.get((_norm(uri), suite)) for uri in entry.uris for suite in entry.suites} - {None}
    if known:
        # Debian's own suites say "Debian"; its backports suite "Debian Backports" (often in the same stanza)
        return 0 if all(o == DEBIAN_ORIGIN or o.startswith(DEBIAN_ORIGIN + " ") for o in known) else None
    keys = entry.signed_by
    if not keys or (len(keys) == 1 and Path(keys[0]).name.startswith("debian-archive-keyring")):
        return 1
    return 2 if any(DEBIAN_PATH.search(uri) for uri in entry.uris) else None


def choose(entries: list[Entry], codename: str | None, origins: dict[tuple[str, str], str]) -> Entry | None:
    """The entry to fetch from: this release's own suite first, confirmed Debian first, a Debian
    archive path first, then apt's order."""
    ranked = []
    for index, entry in enumerate(entries):
        if not entry.uris or not all(uri.startswith(FETCHABLE) for uri in entry.uris):
            continue
        suite_rank = _suite_rank(entry.suites, codename)
        origin_rank = _origin_rank(entry, origins) if suite_rank is not None else None
        if origin_rank is None:
            continue
        path_rank = 0 if any(DEBIAN_PATH.search(uri) for uri in entry.uris) else 1
        ranked.append(((suite_rank, origin_rank, path_rank, index), entry))
    return min(ranked, key=lambda item: item[0])[1] if ranked else None


def render(entry: Entry, suite: str) -> str:
    """The private deb822 source: the entry's archive, for SUITE's main component."""
    signed_by = entry.signed_by or [next((k for k in DEBIAN_KEYRINGS if Path(k).exists()), DEBIAN_KEYRINGS[0])]
    lines = ["Types: deb", f"URIs: {' '.join(entry.uris)}", f"Suites: {suite}", "Components: main"]
    if len(signed_by) == 1:
        lines.append(f"Signed-By: {signed_by[0]}")
    else:  # an inline key: its lines stay continuation lines (an empty one is written ".")
        lines.append("Signed-By:")
        lines.extend(f" {line or '.'}" for line in signed_by)
    lines.extend(f"{name}: {entry.options[name]}" for name in CARRIED_OPTIONS if name in entry.options)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: debian_mirror.py SUITE OUT", file=sys.stderr)
        return 2
    suite, out = argv
    codename = release_codename()
    entry = choose(parse_sources(), codename, apt_origins())
    if entry is None:
        print(f"no Debian archive for {codename or 'this release'} in /etc/apt/sources.list{{,.d}}", file=sys.stderr)
        return 1
    Path(out).write_text(render(entry, suite), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
