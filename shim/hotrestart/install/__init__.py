"""`hotrestart install` and `hotrestart uninstall`: putting the runtime on a node and taking it off.

Run from the node bundle inside a privileged DaemonSet pod, with the host's `/` mounted at the
host root: the bundle is copied to the host, containerd is told of the runtime (2.x: a drop-in
and an import of it; 1.7: a block in its main file), containerd is restarted when that
changed, and the node is labelled ready once the doctor passes. Each module does one part;
`installer` is the flow, `command` the command lines.
"""
