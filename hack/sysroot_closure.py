#!/usr/bin/env python3
"""Print the binary-package dependency closure of some packages in one suite.

Used by hack/install-testbed.sh to decide which .deb files from Debian sid go
into the private sysroot of the test bed.  The walk follows Depends and
Pre-Depends of ``apt-cache show <pkg>/<suite>``, takes the first alternative of
every ``a | b`` group, and leaves out packages that are either essential on the
host anyway or must not be taken from the foreign suite (they are used from the
host, natively, if at all).

Usage: sysroot_closure.py [--suite sid] PKG...
Prints the package names, one per line, in discovery order.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SKIP = frozenset(
    {
        "debconf",
        "perl-base",
        "dpkg",
        "install-info",
        "libc-bin",
        "base-files",
        "tzdata",
        "iproute2",
        "iptables",
    }
)
SKIP_PREFIXES = ("python3",)


def _skipped(name: str, skip: frozenset[str] = SKIP, prefixes: tuple[str, ...] = SKIP_PREFIXES) -> bool:
    return name in skip or name.startswith(prefixes)


def _deps(stanza: str) -> list[str]:
    # Join continuation lines first: long Depends fields may be folded.
    fields: list[str] = []
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        else:
            fields.append(line)
    out: list[str] = []
    for field in fields:
        key, _, value = field.partition(":")
        if key not in ("Depends", "Pre-Depends"):
            continue
        for group in value.split(","):
            first = group.split("|")[0].strip()
            if not first:
                continue
            name = first.split()[0].split(":")[0]
            out.append(name)
    return out


def _show(pkgs: list[str], suite: str) -> dict[str, str]:
    """One apt-cache call for a whole batch (each call parses all package lists)."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *(f"{p}/{suite}" for p in pkgs)],
        capture_output=True,
        text=True,
        check=False,
    )
    stanzas: dict[str, str] = {}
    for stanza in proc.stdout.split("\n\n"):
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                stanzas.setdefault(line.split(":", 1)[1].strip(), stanza)
                break
    return stanzas


def closure(
    roots: list[str], suite: str, skip: frozenset[str] = SKIP, skip_prefixes: tuple[str, ...] = SKIP_PREFIXES
) -> list[str]:
    """The closure of `roots` in `suite`, leaving out `skip` and names with `skip_prefixes`
    (the node bundle keeps Python, which the test bed takes from the host)."""
    order: list[str] = []
    seen: set[str] = set()
    level = [r for r in dict.fromkeys(roots) if not _skipped(r, skip, skip_prefixes)]
    while level:
        seen.update(level)
        stanzas = _show(level, suite)
        nxt: list[str] = []
        for pkg in level:
            stanza = stanzas.get(pkg)
            if stanza is None:
                # A virtual package or one that is missing from the suite.
                if pkg in roots:
                    raise SystemExit(f"sysroot_closure: {pkg} is not in {suite}")
                print(f"sysroot_closure: no {pkg} in {suite}, skipped", file=sys.stderr)
                continue
            order.append(pkg)
            for dep in _deps(stanza):
                if dep not in seen and not _skipped(dep, skip, skip_prefixes) and dep not in nxt:
                    nxt.append(dep)
        level = nxt
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="sid")
    ap.add_argument("packages", nargs="+")
    args = ap.parse_args()
    for pkg in closure(args.packages, args.suite):
        print(pkg)


if __name__ == "__main__":
    main()
