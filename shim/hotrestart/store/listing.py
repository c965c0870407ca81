"""Reading the directory store's tree into entries, bad ones included.

Every entry is listed with its fault when its manifest is missing, refused or unreadable:
manifests are validated field by field (and authenticated with a key), and a bad entry is
reported and skipped, never fatal to a listing, a retention pass or another restore.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from hotrestart.store import safefs
from hotrestart.store.entry import Entry, Fault, Good, identity_key
from hotrestart.store.manifest import MAX_MANIFEST, Identity, Manifest, ManifestError, UnsupportedManifestError
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.sealing import Sealing
from hotrestart.store.tree import MANIFEST, REASON, SMALL, STATES, Tree, one_line


def checked_manifest(text: bytes, name: str, key: str, sealing: Sealing) -> Manifest:
    """The manifest `text` of entry `name` (under identity folder `key`, when given),
    validated and authenticated; raises ManifestError (or UnsupportedManifestError)."""
    manifest = Manifest.from_json(text)
    if manifest.id != name:
        raise ManifestError(f"the manifest is of checkpoint {manifest.id!r}, not {name!r}")
    sealing.authenticate(manifest, text, name)
    if key and identity_key(manifest.identity) != key:
        raise ManifestError("the manifest's identity does not belong in this folder")
    return manifest


class Listing:
    def __init__(self, tree: Tree, sealing: Sealing) -> None:
        self._tree = tree
        self._sealing = sealing

    def entries(self) -> Iterator[Entry]:
        """Every entry, bad ones included with their fault; nothing in the tree stops it."""
        tree = self._tree
        for state in STATES:
            try:
                with tree.at(state) as sfd:
                    names = sorted(n for n in os.listdir(sfd) if not n.startswith("."))
                    if state != "checkpoints":
                        for name in names:
                            yield self.load(sfd, state, name)
                        continue
                    for key in names:
                        try:
                            with safefs.opened_dir(sfd, key) as kfd:
                                cids = sorted(n for n in os.listdir(kfd) if not n.startswith("."))
                                for cid in cids:
                                    yield self.load(kfd, state, cid, key)
                        except UnsafeEntryError as exc:
                            path = os.path.join(tree.dir(state), key)
                            mtime = safefs.mtime(sfd, key)
                            yield Entry(state, key, path, None, Fault.UNSAFE, f"{exc.why}; not followed", "", mtime)
                        except OSError as exc:
                            problem = f"could not be read: {exc.strerror or exc}"
                            yield Entry(state, key, os.path.join(tree.dir(state), key), None, Fault.UNREADABLE, problem)
            except FileNotFoundError:
                continue
            except OSError:
                continue  # reported by problems()

    def load(self, parent: int, state: str, name: str, key: str = "") -> Entry:
        """The entry `name` in the folder `parent`, its manifest checked."""
        path = os.path.join(*([self._tree.dir(state)] + ([key] if key else []) + [name]))
        mtime = safefs.mtime(parent, name)
        manifest: Manifest | None = None
        fault: Fault | None = None
        problem = ""
        try:
            safefs.check_name(name)
            with safefs.opened_dir(parent, name) as fd:
                try:
                    text = safefs.read_file(fd, MANIFEST, MAX_MANIFEST)
                except FileNotFoundError:
                    if state == "checkpoints":  # published means a manifest was written first
                        raise ManifestError("no manifest") from None
                    return Entry(state, name, path, None, None, "no manifest", key, mtime)
                manifest = checked_manifest(text, name, key, self._sealing)
        except UnsupportedManifestError as exc:
            manifest, fault, problem = None, Fault.UNSUPPORTED, str(exc)
        except ManifestError as exc:
            manifest, fault, problem = None, Fault.CORRUPT, str(exc)
        except UnsafeEntryError as exc:
            # The entry itself not a folder is unsafe; a link or FIFO as its manifest, corrupt.
            manifest, fault = None, (Fault.UNSAFE if exc.what == name else Fault.CORRUPT)
            problem = f"{exc.what} {exc.why}" if exc.what != name else f"{exc.why}; not followed"
        except OSError as exc:
            manifest, fault, problem = None, Fault.UNREADABLE, f"could not be read: {exc.strerror or exc}"
        return Entry(state, name, path, manifest, fault, problem, key, mtime)

    def problems(self) -> list[str]:
        """What is wrong with the layout itself (a state folder that is a link, say)."""
        found = []
        for state in ("", *STATES, "pending"):
            try:
                with self._tree.at(*([state] if state else [])):
                    pass
            except FileNotFoundError:
                continue
            except OSError as exc:
                found.append(f"v1/{state}: {exc.strerror if not isinstance(exc, UnsafeEntryError) else exc.why}")
        return found

    def published(self, identity: Identity) -> list[Entry]:
        """Every entry in the identity's folder, bad ones included (with their fault)."""
        key = identity_key(identity)
        try:
            with self._tree.at("checkpoints", key) as kfd:
                names = sorted(os.listdir(kfd))
                return [self.load(kfd, "checkpoints", name, key) for name in names if not name.startswith(".")]
        except OSError:
            return []

    def matching(self, identity: Identity) -> list[Good]:
        """The identity's published checkpoints that can be used."""
        return [
            Good(e)
            for e in self.published(identity)
            if e.manifest is not None and e.manifest.identity.same(identity) and e.fault is None
        ]

    def latest(self, identity: Identity) -> Entry | None:
        """The newest readable published checkpoint of `identity` (its namespace included)."""
        best = max(self.matching(identity), key=lambda e: e.manifest.created_at, default=None)
        return best.entry if best is not None else None

    def find(self, prefix: str) -> Entry | None:
        matches = [e for e in self.entries() if e.id.startswith(prefix)]
        return matches[0] if len(matches) == 1 else None

    def reason(self, entry: Entry) -> str:
        """A quarantined entry's reason.txt (one line, bounded), or ""."""
        try:
            with self._tree.of(entry) as fd:
                return one_line(safefs.read_file(fd, REASON, SMALL).decode(errors="replace"))
        except OSError:
            return ""

    def size(self, entry: Entry) -> int:
        """Bytes the entry refers to: its chunks (shared ones included) and its own files
        (regular files only; nothing below the entry is followed)."""
        chunks = entry.manifest.stored_bytes if entry.manifest is not None else 0
        try:
            with self._tree.of(entry) as fd:
                return chunks + safefs.tree_size(fd)
        except OSError:
            return chunks
