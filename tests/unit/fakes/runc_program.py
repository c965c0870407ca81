"""A stand-in for the runc binary: the verbs and flags the shim uses, with real processes, no root.

Installed as an executable named `runc` (see `fakes.FakeRunc`), this program keeps each
container's state as files under `--root`, and its processes are real: `create` forks an init
that waits on `<root>/<id>/exec.fifo` the way runc's does, then execs `process.args` from the
bundle's config.json; `start` opens the FIFO and so releases it. The init stays a child of this
program, which exits, so it is re-parented to the nearest child subreaper (the shim under test).
Processes inherit this program's stdin, stdout and stderr, as they do runc's.

The folder the program is installed in is its home: every call is appended to
`calls.jsonl` there; `fail/<verb>` (JSON {"msg": ..., "code": ...}) makes that verb log the
message to `--log` as runc does ({"level":"error","msg":...}) and exit with the code;
`delay/<verb>` (seconds) makes it sleep before doing anything. `--version` is the verb `version`.

It needs only the standard library: it runs with `python -S`, for a fast start. Its modules are in
`fakerunc/` beside this file; the installed copy is told where (see `FakeRunc`).
"""

import os
import sys

from fakerunc.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], home=os.path.dirname(os.path.abspath(__file__))))
