"""Reading the store key ring from a key file or a key directory.

Key file
--------
One key per line, `<name>:<base64 of 32 random bytes>`; blank lines and lines starting
with `#` are ignored. The first key seals new checkpoints; every key opens them. Names
are 1-64 of `A-Z a-z 0-9 . _ -`, not starting with a dot, and are written into each
manifest. The file must be a regular file (not a symbolic link) owned by root with no
rights for group or others, and at most 64 KiB. Every node that shares a store needs the
same keys: create the file once and copy it to each node::

    install -m 0600 -o root /dev/null /etc/hotrestart/store-key
    echo "k$(date +%Y%m%d):$(head -c 32 /dev/urandom | base64 -w0)" >> /etc/hotrestart/store-key

Key directory (a Kubernetes Secret mounted as a volume)
-------------------------------------------------------
Each file is one key named by its file name, holding the base64 text of 32 random bytes.
A file `active` holds the name of the key that seals; it is required when there is more
than one key, so that adding a key never changes which one seals (a node that has not
received the new key yet could not read what others seal with it). Names starting with a
dot are skipped: they are the Secret volume's own layout (`..data`), whose links are
followed as long as they stay inside the directory. Each key file must be owned by root
with no rights for group or others: mount it with `defaultMode: 0400` and no `fsGroup`::

    kubectl -n kube-system create secret generic hotrestart-store-key \\
        --from-literal=k20250101="$(head -c 32 /dev/urandom | base64 -w0)" \\
        --from-literal=active=k20250101

Rotation
--------
1. Add the new key everywhere, not sealing yet: every node then opens both. In the key
   file, as a line after the first, the same line on every node::

       line="k20250601:$(head -c 32 /dev/urandom | base64 -w0)"   # once
       echo "$line" >> /etc/hotrestart/store-key                    # on each node

   In the Secret::

       kubectl -n kube-system patch secret hotrestart-store-key --type merge -p \\
           "{\\"stringData\\":{\\"k20250601\\":\\"$(head -c 32 /dev/urandom | base64 -w0)\\"}}"

2. Once every node has it, make it seal: move its line first in the key file, or::

       kubectl -n kube-system patch secret hotrestart-store-key --type merge \\
           -p '{"stringData":{"active":"k20250601"}}'

3. Once no checkpoint sealed with the old key is wanted any more (retention removes them;
   one that no longer opens means a cold start, never a failed one), remove the old key:
   its line, or::

       kubectl -n kube-system patch secret hotrestart-store-key --type json \\
           -p '[{"op":"remove","path":"/data/k20250101"}]'
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat

from hotrestart.store.seal import KEY_BYTES, KEY_NAME, MAX_KEYS, KeyRing, SealError

MAX_KEY_FILE = 64 << 10
ACTIVE = "active"  # in a key directory: the file naming the key that seals


def load(path: str, *, owner: int = 0) -> KeyRing:
    """Read a key file or key directory (see the module's docstring).

    `owner` is the uid the key files must belong to (root; tests pass their own)."""
    try:
        # O_NONBLOCK: a FIFO put in the key's place must not hang the shim on open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SealError(f"store key {path}: {_why(exc)}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return KeyRing(_load_dir(path, fd, owner))
        return KeyRing(_parse_file(path, _read_key_file(path, fd, owner)))
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link; give the file itself"
    return exc.strerror or str(exc)


def _read_key_file(path: str, fd: int, owner: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SealError(f"store key {path}: not a regular file")
    if st.st_uid != owner:
        raise SealError(f"store key {path}: owned by uid {st.st_uid}, must be owned by uid {owner}")
    if st.st_mode & 0o077:
        raise SealError(
            f"store key {path}: mode {stat.S_IMODE(st.st_mode):04o} gives group or others access; chmod 0600 or 0400"
        )
    if st.st_size > MAX_KEY_FILE:
        raise SealError(f"store key {path}: larger than {MAX_KEY_FILE} bytes")
    data = b""
    while len(data) <= MAX_KEY_FILE:  # the size may have changed since fstat
        more = os.read(fd, MAX_KEY_FILE + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > MAX_KEY_FILE:
        raise SealError(f"store key {path}: larger than {MAX_KEY_FILE} bytes")
    return data


def _decode_key(where: str, name: str, text: str) -> bytes:
    # Errors name the key, never echo its text.
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"{where}: key {name!r} is not base64") from None
    if len(key) != KEY_BYTES:
        raise SealError(f"{where}: key {name!r} is {len(key)} bytes, not {KEY_BYTES}")
    return key


def _parse_file(path: str, data: bytes) -> list[tuple[str, bytes]]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SealError(f"store key {path}: not ASCII text") from None
    keys: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        where = f"store key {path}, line {number}"
        if not colon:
            raise SealError(f"{where}: not <name>:<base64 key>")
        if not KEY_NAME.fullmatch(name):
            raise SealError(f"{where}: key name {name!r} is not 1-64 of A-Z a-z 0-9 . _ - (no leading dot)")
        if any(n == name for n, _ in keys):
            raise SealError(f"{where}: key {name!r} is listed twice")
        keys.append((name, _decode_key(where, name, value)))
    if not keys:
        raise SealError(f"store key {path}: no keys")
    return keys


def _load_dir(path: str, dir_fd: int, owner: int) -> list[tuple[str, bytes]]:
    # The directory itself may be world-writable with the sticky bit (a Secret volume is);
    # what counts is that each key file is root's and private, checked on the open file.
    base = os.path.realpath(path)
    keys: dict[str, bytes] = {}
    active: str | None = None
    for name in sorted(os.listdir(dir_fd)):
        if name.startswith("."):
            continue
        target = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([base, target]) != base:
            raise SealError(f"store key {path}/{name}: leads outside the key directory")
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SealError(f"store key {path}/{name}: {_why(exc)}") from exc
        try:
            data = _read_key_file(f"{path}/{name}", fd, owner)
        finally:
            os.close(fd)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise SealError(f"store key {path}/{name}: not ASCII text") from None
        if name == ACTIVE:
            active = text.strip()
            continue
        if not KEY_NAME.fullmatch(name):
            raise SealError(f"store key {path}/{name}: key name is not 1-64 of A-Z a-z 0-9 . _ -")
        if len(keys) >= MAX_KEYS:
            raise SealError(f"store key {path}: more than {MAX_KEYS} keys")
        keys[name] = _decode_key(f"store key {path}", name, text)
    if not keys:
        raise SealError(f"store key {path}: no keys")
    if active is None:
        if len(keys) > 1:
            raise SealError(f"store key {path}: {len(keys)} keys and no file {ACTIVE!r} naming the one that seals")
        (active,) = keys
    if active not in keys:
        raise SealError(f"store key {path}: {ACTIVE!r} names {active!r}, which is not one of its keys")
    return [(active, keys[active])] + [(n, k) for n, k in keys.items() if n != active]
