"""scripts/debian_mirror.py: which of a machine's apt sources setup.sh fetches containerd, runsc and
vhost-device-vsock from, and the private source it writes (checked by apt itself against a local
signed archive: nothing here reads or changes the machine's apt configuration)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_module() -> ModuleType:
    # a script, not a package: load it by path
    spec = importlib.util.spec_from_file_location("debian_mirror", REPO / "scripts" / "debian_mirror.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


dm = load_module()
DEBIAN = "http://mirror.example/debian"
DOCKER = "https://download.example/linux/debian"  # a third-party repository's path may end in /debian too


def machine(tmp_path: Path, files: dict[str, str], codename: str | None = "bookworm") -> Path:
    root = tmp_path / "root"
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text('ID=debian\n' + (f'VERSION_CODENAME={codename}\n' if codename else ""))
    for name, text in files.items():
        (root / "etc/apt" / name).write_text(text)
    return root


def chosen(root: Path, origins: dict | None = None):
    return dm.choose(dm.parse_sources(root), dm.release_codename(root), origins or {})


DEBIAN_LIST = f"deb {DEBIAN} bookworm main\n"
DOCKER_SOURCES = (f"Types: deb\nURIs: {DOCKER}\nSuites: bookworm\nComponents: stable\n"
                  "Signed-By: /etc/apt/keyrings/docker.asc\n")


def test_a_third_party_repository_for_the_release_is_not_debians(tmp_path: Path) -> None:
    # Docker's stanza ties with Debian's on the suite and the /debian path
    root = machine(tmp_path, {"sources.list": DEBIAN_LIST, "sources.list.d/docker.sources": DOCKER_SOURCES})
    origins = {(dm._norm(DOCKER + "/"), "bookworm"): "Docker", (dm._norm(DEBIAN + "/"), "bookworm"): "Debian"}
    assert chosen(root, origins).uris == [DEBIAN]
    # lists not fetched yet: Docker's entry is signed by another key than Debian's
    assert chosen(root).uris == [DEBIAN]
    # even where it comes first
    root = machine(tmp_path / "2", {"sources.list.d/0-docker.sources": DOCKER_SOURCES,
                                    "sources.list.d/debian.sources": f"Types: deb\nURIs: {DEBIAN}\nSuites: bookworm\n"})
    assert chosen(root).uris == [DEBIAN]


def test_a_debian_stanza_with_its_backports_suite_is_debians(tmp_path: Path) -> None:
    # Cloud images list bookworm, -updates and -backports in one stanza; the backports Release file says
    # "Debian Backports", and the stanza was refused: setup found no mirror and stopped at containerd.
    stanza = (f"Types: deb\nURIs: {DEBIAN}\nSuites: bookworm bookworm-updates bookworm-backports\n"
              "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    root = machine(tmp_path, {"sources.list.d/debian.sources": stanza, "sources.list.d/docker.sources": DOCKER_SOURCES})
    base = dm._norm(DEBIAN + "/")
    origins = {(base, "bookworm"): "Debian", (base, "bookworm-updates"): "Debian",
               (base, "bookworm-backports"): "Debian Backports", (dm._norm(DOCKER + "/"), "bookworm"): "Docker"}
    assert chosen(root, origins).uris == [DEBIAN]


def test_an_unsigned_third_party_entry_loses_to_its_release_file(tmp_path: Path) -> None:
    other = "http://repo.example/debian"
    root = machine(tmp_path, {"sources.list": f"deb {other} bookworm main\n{DEBIAN_LIST}"})
    origins = {(other, "bookworm"): "Example", (dm._norm(DEBIAN), "bookworm"): "Debian"}
    assert chosen(root, origins).uris == [DEBIAN]


def test_only_this_release_and_never_security(tmp_path: Path) -> None:
    root = machine(tmp_path, {"sources.list": (f"deb {DEBIAN}-security bookworm-security main\n"
                                               f"deb {DEBIAN} sid main\n"
                                               f"deb http://updates.example/debian bookworm-updates main\n"
                                               f"deb {DEBIAN} bookworm main\n")})
    assert chosen(root).uris == [DEBIAN] and chosen(root).suites == ["bookworm"]
    # no entry for the release itself: one of its other suites will do, -security never
    root = machine(tmp_path / "2", {"sources.list": (f"deb {DEBIAN}-security bookworm-security main\n"
                                                     f"deb {DEBIAN} sid main\n"
                                                     "deb http://updates.example/debian bookworm-updates main\n")})
    assert chosen(root).uris == ["http://updates.example/debian"]
    root = machine(tmp_path / "3", {"sources.list": f"deb {DEBIAN}-security bookworm-security main\n"
                                                    f"deb {DEBIAN} sid main\n"})
    assert chosen(root) is None


def test_all_uris_and_options_are_carried_over(tmp_path: Path) -> None:
    snapshot = "http://snapshot.example/archive/debian/20250520T000000Z"
    root = machine(tmp_path, {"sources.list.d/debian.sources": (
        f"Types: deb\n# a comment inside the stanza\nURIs: {snapshot}\n  {DEBIAN}\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "Check-Valid-Until: no\nTrusted: yes\n\n"
        f"Types: deb-src\nURIs: {DEBIAN}\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n")})
    entry = chosen(root)
    assert entry.uris == [snapshot, DEBIAN]
    assert dm.render(entry, "unstable") == (
        f"Types: deb\nURIs: {snapshot} {DEBIAN}\nSuites: unstable\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\nCheck-Valid-Until: no\nTrusted: yes\n")
    # the one-line format's options
    root = machine(tmp_path / "2", {"sources.list": f"deb [ arch=amd64 check-valid-until=no trusted=yes ] {DEBIAN} "
                                                    "bookworm main\n"})
    assert dm.render(chosen(root), "unstable") == (
        f"Types: deb\nURIs: {DEBIAN}\nSuites: unstable\nComponents: main\n"
        f"Signed-By: {dm.DEBIAN_KEYRINGS[0]}\nCheck-Valid-Until: no\nTrusted: yes\n")


def test_an_entry_without_a_key_gets_the_keyring_file_the_machine_has(tmp_path: Path, monkeypatch) -> None:
    # Debian 13's debian-archive-keyring ships .pgp; a .gpg named instead would not exist there.
    pgp = tmp_path / "debian-archive-keyring.pgp"
    pgp.write_bytes(b"")
    monkeypatch.setattr(dm, "DEBIAN_KEYRINGS", (str(tmp_path / "debian-archive-keyring.gpg"), str(pgp)))
    root = machine(tmp_path, {"sources.list": f"deb {DEBIAN} trixie main\n"}, codename="trixie")
    assert f"Signed-By: {pgp}\n" in dm.render(chosen(root), "unstable")


KEY = ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", "mDMEaw2PjhYJKwYBBAHaRw8BAQdA76Wg8nJfaIuYCoSocr7ayRpjzA3m6AXiAUbk",
       "=abcd", "-----END PGP PUBLIC KEY BLOCK-----"]


def inline_key_field(key_lines: list[str]) -> str:
    return "Signed-By:\n" + "".join(f" {line or '.'}\n" for line in key_lines)


def test_an_inline_key_stays_a_multi_line_field(tmp_path: Path) -> None:
    root = machine(tmp_path, {"sources.list.d/debian.sources": (
        f"Types: deb\nURIs: {DEBIAN}\nSuites: bookworm\nComponents: main\n{inline_key_field(KEY)}")})
    text = dm.render(chosen(root), "unstable")
    assert inline_key_field(KEY) in text
    [stanza] = dm.deb822_stanzas(text)
    assert stanza["signed-by"] == ["", *[line or "." for line in KEY]]


def test_the_release_comes_from_os_release(tmp_path: Path) -> None:
    root = machine(tmp_path, {"sources.list": f"deb {DEBIAN} trixie main\n{DEBIAN_LIST}"}, codename="trixie")
    assert chosen(root).suites == ["trixie"]
    # no codename (an unreleased Debian): a plain suite, as before
    sources = f"deb {DEBIAN}-security sid-security main\ndeb {DEBIAN} sid main\n"
    root = machine(tmp_path / "2", {"sources.list": sources}, codename=None)
    assert chosen(root).suites == ["sid"]


# -- the written source, as apt reads it ---------------------------------------------------------------

@pytest.fixture
def gnupg_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    yield home
    # gpg started an agent for this home: end it with the test
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False, capture_output=True)


def local_archive(tmp_path: Path, home: Path, suite: str, valid_until: datetime | None) -> tuple[Path, list[str]]:
    """A file: archive with an empty main/binary-amd64 for SUITE, its InRelease signed by a new key
    made in HOME; returns the archive and the key (ASCII-armoured lines)."""
    gpg = ["gpg", "--batch", "--quiet", "--homedir", str(home)]
    subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", "archive@example.invalid", "ed25519", "sign",
                    "never"], check=True, capture_output=True)
    archive = tmp_path / "debian"
    dist = archive / "dists" / suite
    (dist / "main/binary-amd64").mkdir(parents=True)
    (dist / "main/binary-amd64/Packages").write_bytes(b"")
    release = [f"Origin: Debian\nSuite: {suite}\nDate: {format_datetime(datetime.now(UTC), usegmt=True)}"]
    if valid_until:
        release.append(f"Valid-Until: {format_datetime(valid_until, usegmt=True)}")
    empty_sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    release.append(f"Architectures: amd64\nComponents: main\nSHA256:\n {empty_sha256} 0 main/binary-amd64/Packages\n")
    (dist / "Release").write_text("\n".join(release))
    subprocess.run([*gpg, "--clearsign", "-o", str(dist / "InRelease"), str(dist / "Release")], check=True)
    key = subprocess.run([*gpg, "--export", "--armor"], check=True, capture_output=True, text=True).stdout
    return archive, key.splitlines()


def apt_update(tmp_path: Path, source_text: str) -> subprocess.CompletedProcess:
    """`apt-get update` of SOURCE_TEXT alone, with a private apt state (as setup.sh's fetch does)."""
    state = tmp_path / "apt"
    (state / "lists/partial").mkdir(parents=True)
    (state / "private.sources").write_text(source_text)
    options = [f"Dir::Etc::SourceList={state}/private.sources", "Dir::Etc::SourceParts=/dev/null",
               f"Dir::State::Lists={state}/lists", f"Dir::Cache={state}/cache", "Dir::State::status=/dev/null",
               "APT::Sandbox::User=root", "Acquire::Languages=none", "APT::Architectures::=amd64",
               # the machine's apt.conf.d may switch the Valid-Until check off: on, as by default
               "Acquire::Check-Date=true", "Acquire::Check-Valid-Until=true"]
    return subprocess.run(["apt-get", "-qq", *(arg for option in options for arg in ("-o", option)), "update"],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("gpg") and shutil.which("gpgconf"))
                    or os.geteuid() != 0, reason="needs apt-get, gpg and root (apt's private state as root)")
def test_apt_takes_the_written_source(tmp_path: Path, gnupg_home: Path) -> None:
    # a machine whose Debian entry has an inline key and is past its Valid-Until (a snapshot's)
    archive, key = local_archive(tmp_path, gnupg_home, "unstable", valid_until=datetime.now(UTC) - timedelta(days=3))
    root = machine(tmp_path, {
        "sources.list.d/debian.sources": (f"Types: deb\nURIs: file://{archive}\nSuites: bookworm\nComponents: main\n"
                                          f"{inline_key_field(key)}Check-Valid-Until: no\n"),
        "sources.list.d/docker.sources": DOCKER_SOURCES})
    text = dm.render(chosen(root), "unstable")
    out = apt_update(tmp_path, text)
    assert out.returncode == 0, text + out.stdout + out.stderr
    assert list((tmp_path / "apt/lists").glob("*_dists_unstable_InRelease"))
    # what the private source would be with the key folded into one line, or without the option
    folded = text.replace(inline_key_field(key), "Signed-By: " + " ".join(line or "." for line in key) + "\n")
    assert apt_update(tmp_path / "folded", folded).returncode != 0
    assert apt_update(tmp_path / "no-option", text.replace("Check-Valid-Until: no\n", "")).returncode != 0
