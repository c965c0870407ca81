"""The only edits made to containerd's main file, each checked by reading the result back.

For containerd 2.x, one entry of the top-level `imports` naming our drop-in (or the line
`imports = [...]` after `version`). For containerd 1.7, whose imports replace whole plugin
sections, our runtime's tables as one block at the end of the file between marker comments.
tomllib must read each result as the original plus (or minus) exactly that, or nothing is
written; the rest of the administrator's file is never rewritten.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from hotrestart.install import toml_text
from hotrestart.install.errors import InstallError
from hotrestart.node_config import path_match

BEGIN = "# >>> hotrestart: added by `hotrestart install`, removed by `hotrestart uninstall` >>>"
END = "# <<< hotrestart <<<"


def covered(imports: list[str], dropin: str, config_dir: str) -> bool:
    """Whether an `imports` entry (a path or a glob; relative ones are taken from the main
    file's folder, as containerd takes them) already names the drop-in."""
    for entry in imports:
        path = entry if os.path.isabs(entry) else os.path.join(config_dir, entry)
        if os.path.normpath(path) == dropin or path_match(path, dropin):
            return True
    return False


def _imports(config: Mapping[str, Any], where: str) -> list[str] | None:
    imports = config.get("imports")
    if imports is None:
        return None
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise InstallError(f"{where}: `imports` is not a list of paths")
    return imports


def add_import(text: str | None, dropin: str, *, version: int, config_path: str) -> str | None:
    """The main file with `dropin` imported; None when an import already covers it. `text`
    None: there is no main file, and this makes one."""
    if text is None:
        return f"version = {version}\nimports = [{toml_text.toml_string(dropin)}]\n"
    before = toml_text.parse(text, config_path)
    imports = _imports(before, config_path)
    if imports is not None and covered(imports, dropin, os.path.dirname(config_path)):
        return None
    if imports is None:
        found = toml_text.statement(text, "version")
        if found is None:
            raise InstallError(f"{config_path}: cannot find its top-level `version = N` line to add `imports` after")
        edited = toml_text.insert(text, found[1], f"\nimports = [{toml_text.toml_string(dropin)}]")
    else:
        edited = toml_text.append_entry(text, toml_text.array_of(text, "imports", config_path), dropin)
    _check(edited, {**before, "imports": [*(imports or []), dropin]}, config_path, f"adding {dropin} to its imports")
    return edited


def remove_import(text: str, dropin: str, *, config_path: str, keep_line: bool = False) -> str | None:
    """The main file without the `imports` entry naming exactly `dropin`; None when it has none.
    When that was the only entry, the whole `imports` line goes, unless `keep_line` (the file
    had one before the install, as `containerd config default` writes `imports = []`)."""
    before = toml_text.parse(text, config_path)
    imports = _imports(before, config_path)
    if not imports or dropin not in imports:
        return None
    kept = [i for i in imports if i != dropin]
    if not kept and not keep_line:
        found = toml_text.statement(text, "imports")
        assert found is not None  # tomllib found a top-level `imports`
        start = text.rfind("\n", 0, found[0]) + 1
        if text[start : found[0]].strip():
            raise InstallError(f"{config_path}: `imports` does not start its line; refusing to edit it")
        if found[1] < len(text):
            edited = toml_text.cut(text, start, found[1] + 1)
        else:  # the last line, with no newline after: the one before it was ours too
            edited = toml_text.cut(text, max(start - 1, 0), found[1])
        expected = {k: v for k, v in before.items() if k != "imports"}
    else:
        edited = text
        while True:  # one entry at a time, the text read afresh: an entry may be listed twice
            array = toml_text.array_of(edited, "imports", config_path)
            ours = [item for item in array.items if toml_text.value(edited[item[0] : item[1]]) == dropin]
            if not ours:
                break
            for span in toml_text.entry_cuts(edited, array, ours[0]):
                edited = toml_text.cut(edited, *span)
        expected = {**before, "imports": kept}
    _check(edited, expected, config_path, f"removing {dropin} from its imports")
    return edited


def _block_span(text: str) -> tuple[int, int] | None:
    """Where our block is: from the blank line before BEGIN (or, at the end of a file that
    had no final newline, the newline added before it) to the newline after END."""
    begin = text.find(BEGIN + "\n")
    if begin == -1 or (begin > 0 and text[begin - 1] != "\n"):
        return None
    end = text.find("\n" + END, begin)
    if end == -1:
        return None
    end += len(END) + 1
    end = end + 1 if text[end : end + 1] == "\n" else end
    if text[max(begin - 2, 0) : begin] == "\n\n" or begin == 1 or (begin > 0 and end == len(text)):
        return begin - 1, end
    return begin, end


def without_block(text: str) -> str:
    span = _block_span(text)
    return text if span is None else toml_text.cut(text, *span)


def add_block(text: str | None, block: str, *, version: int, config_path: str) -> str | None:
    """The main file with our block (BEGIN ... END, as `block` has it) at its end, or in place
    of the one there; None when that block is there already."""
    if text is None:
        return f"version = {version}\n\n{block}"
    span = _block_span(text)
    if span is not None and text[span[0] : span[1]].strip("\n") == block.strip("\n"):
        return None
    base = without_block(text)
    if span is not None:
        edited = text[: span[0]] + ("\n" if span[0] > 0 else "") + block + text[span[1] :]
    else:
        # After a blank line; straight after the last line when the file had no final
        # newline, so that the removal can tell and give back the same bytes.
        edited = base + "\n" + block
    expected = _merged(toml_text.parse(base, config_path), toml_text.parse(block, "our block"), config_path)
    _check(edited, expected, config_path, "adding our runtime's tables at its end")
    return edited


def remove_block(text: str, *, config_path: str) -> str | None:
    """The main file without our block; None when it has none."""
    span = _block_span(text)
    if span is None:
        return None
    edited = toml_text.cut(text, *span)
    block = text[span[0] : span[1]]
    expected = toml_text.parse(text, config_path)
    merged = _merged(toml_text.parse(edited, config_path), toml_text.parse(block, "our block"), config_path)
    if merged != expected:
        raise InstallError(f"{config_path}: removing our block would change more than it: edit the file by hand")
    return edited


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`base` with the tables of `extra` added; a key both define is refused."""
    out = dict(base)
    for key, value in extra.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = _merged(out[key], value, where)
        else:
            raise InstallError(f"{where} sets {key!r} already: refusing to add ours over it")
    return out


def _check(edited: str, expected: Mapping[str, Any], where: str, what: str) -> None:
    try:
        after = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{where}: {what} would not be valid TOML ({exc}); nothing was changed") from None
    if after != expected:
        raise InstallError(
            f"{where}: {what} would change more than that (an unusual layout?); nothing was changed: "
            "edit the file by hand"
        )
