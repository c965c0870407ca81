#!/usr/bin/env python3
"""Build the node bundle: dist/hotrestart-<version>-linux-amd64.tar.gz (`make dist`).

The bundle is a relocatable tree that runs on any x86-64 Linux with a recent kernel, whatever
the host's C library and whether or not the host has Python:

  bin/containerd-shim-hotrestart-v2, bin/hotrestart, bin/criu, bin/crit, bin/python3
                          links to libexec/launcher, a static program that runs each through
                          the bundle's own dynamic loader (see hack/bundle/launcher.c)
  libexec/python3         CPython from Debian (unstable by default: see --suite)
  libexec/criu            CRIU from the same suite
  libexec/hotrestart/     the Python entry scripts
  lib/x86_64-linux-gnu/   the C library, the loader and every library the above need
  lib/python3.13/         the standard library
  lib/python3/dist-packages/
                          hotrestart, its dependencies (pinned wheels, hack/bundle/requirements.txt)
                          and CRIU's pycriu/crit
  share/doc/debian/       the Debian packages' copyright files
  share/hotrestart/bundle.json
                          the bundle's version and what it carries, with every input

Inputs: Debian packages (apt-get download from the release named by --suite, through the apt
sources of the test bed), wheels pinned by hash, this checkout, and the C compiler for the
launcher. The same inputs give the same bytes: files are sorted, owned by root, dated
SOURCE_DATE_EPOCH (default: the checkout's last commit), bytecode is hash-based, and gzip
carries no timestamp. bundle.json lists every package and wheel with its version, so two
bundles can be compared input by input; a Debian point release changes the inputs.

The suite is Debian's unstable one by default because CRIU has to keep up with the kernel:
trixie's CRIU 4.1.1 cannot dump TCP sockets on 6.18 kernels, which 4.2.1 does.

Usage: build-bundle.py [--out dist] [--work build/bundle] [--suite sid]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import sysroot_closure  # noqa: E402

PYTHON_VERSION = "3.13"
# libstdc++6: the protobuf and grpcio wheels link it.
ROOTS = ["criu", f"python{PYTHON_VERSION}-minimal", f"libpython{PYTHON_VERSION}-stdlib", "libstdc++6"]
# Pure Python, taken without its Debian dependencies: protobuf comes from the pinned wheels.
EXTRA = ["python3-pycriu"]
# Python's own packaging (python3, python3-minimal), data the host keeps in /etc or does
# without, and Debian's protobuf (the wheels carry it).
SKIP = sysroot_closure.SKIP | {
    "python3",
    "python3-minimal",
    f"python{PYTHON_VERSION}",
    "libpython3-stdlib",
    "python3-protobuf",
    "media-types",
    "netbase",
    "readline-common",
}
LIBDIR = "lib/x86_64-linux-gnu"
LOADER = f"{LIBDIR}/ld-linux-x86-64.so.2"
SITE = "lib/python3/dist-packages"
STDLIB = f"lib/python{PYTHON_VERSION}"
LAUNCHED = ["containerd-shim-hotrestart-v2", "hotrestart", "criu", "crit", "python3"]
SCRIPTS = {
    # The shim's entry stays as lean as the installed one (see shim/bin/containerd-shim-hotrestart-v2).
    "containerd-shim-hotrestart-v2": "import sys\n\nfrom hotrestart.shim_main import main\n\nsys.exit(main())\n",
    "hotrestart": "import sys\n\nfrom hotrestart.cli import main\n\nsys.exit(main())\n",
    "crit": "import sys\n\nfrom crit.__main__ import main\n\nsys.exit(main())\n",
}
APT_OPTS = ["-o", "Acquire::Retries=3", "-o", "APT::Sandbox::User=root"]


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def version() -> str:
    text = (REPO / "shim" / "hotrestart" / "__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise SystemExit("no __version__ in shim/hotrestart/__init__.py")
    return match.group(1)


def source_epoch() -> int:
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True).stdout
        return int(out.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 0


def commit() -> str:
    try:
        out = run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).stdout.strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("-dirty" if dirty.stdout.strip() else "")


def download_debs(suite: str, work: Path) -> dict[str, str]:
    """Download the closure into work/debs; returns {package: version}."""
    debs = work / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    names = sysroot_closure.closure(ROOTS, suite, skip=frozenset(SKIP), skip_prefixes=()) + EXTRA
    log(f"downloading {len(names)} packages from {suite}")
    run(["apt-get", *APT_OPTS, "download", "-qq", *(f"{n}/{suite}" for n in names)], cwd=debs)
    found: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True).stdout
        package = re.search(r"^Package: (\S+)", fields, re.M)
        ver = re.search(r"^Version: (\S+)", fields, re.M)
        if not package or not ver:
            raise SystemExit(f"{deb}: no Package/Version")
        found[package.group(1)] = ver.group(1)
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"packages not downloaded: {sorted(missing)}")
    return found


def unpack_debs(work: Path) -> Path:
    sysroot = work / "sysroot"
    shutil.rmtree(sysroot, ignore_errors=True)
    sysroot.mkdir()
    for deb in sorted((work / "debs").glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(sysroot)])
    return sysroot


def copy_tree(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> None:
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or n in exclude}

    shutil.copytree(src, dst, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def assemble(sysroot: Path, tree: Path, launcher: Path) -> None:
    usr = sysroot / "usr"
    (tree / "bin").mkdir(parents=True)
    (tree / "libexec" / "hotrestart").mkdir(parents=True)
    copy_tree(usr / "lib" / "x86_64-linux-gnu", tree / LIBDIR)
    if not (tree / LOADER).exists():
        raise SystemExit(f"no {LOADER} in the packages")
    copy_tree(usr / "lib" / f"python{PYTHON_VERSION}", tree / STDLIB)
    shutil.copy2(usr / "bin" / f"python{PYTHON_VERSION}", tree / "libexec" / "python3")
    shutil.copy2(usr / "sbin" / "criu", tree / "libexec" / "criu")
    for name in ("pycriu", "crit"):
        copy_tree(usr / "lib" / "python3" / "dist-packages" / name, tree / SITE / name)
    for info in sorted((usr / "lib" / "python3" / "dist-packages").glob("*.dist-info")):
        copy_tree(info, tree / SITE / info.name)
    for doc in sorted((usr / "share" / "doc").glob("*/copyright")):
        dest = tree / "share" / "doc" / "debian" / doc.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(doc, dest / "copyright")
    # CRIU's plugins come from here only (the launcher points CRIU_LIBS_DIR at it).
    (tree / "lib" / "criu").mkdir(parents=True, exist_ok=True)
    shutil.copy2(launcher, tree / "libexec" / "launcher")
    for name in LAUNCHED:
        (tree / "bin" / name).symlink_to("../libexec/launcher")
    for name, text in SCRIPTS.items():
        (tree / "libexec" / "hotrestart" / name).write_text(text)


def drop_outside_links(tree: Path) -> None:
    """Remove links that leave the tree. Debian links the interpreter's sitecustomize.py to
    /etc/python3.X: followed on a host that has that file, the bundle's Python would run the
    host's code at every start."""
    for path in sorted(tree.rglob("*")):
        if not path.is_symlink():
            continue
        target = os.readlink(path)
        inside = os.path.realpath(path).startswith(str(tree) + "/")
        if target.startswith("/") or not inside:
            if path.name != "sitecustomize.py":
                raise SystemExit(f"{path.relative_to(tree)} links outside the bundle ({target})")
            path.unlink()


def install_wheels(tree: Path, work: Path) -> dict[str, str]:
    """Our package and the pinned dependencies into the bundle's site directory."""
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    pip = [sys.executable, "-m", "pip"]
    target = [
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        f"cp{PYTHON_VERSION.replace('.', '')}",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "any",
        "--only-binary=:all:",
    ]
    requirements = HERE / "bundle" / "requirements.txt"
    log("downloading the pinned wheels")
    run([*pip, "download", "-q", "--no-deps", "--require-hashes", *target, "-d", str(wheels), "-r", str(requirements)])
    log("building the hotrestart wheel")
    run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)])
    log("installing into the bundle")
    # By name from --find-links (not by file path), so pip records no build-host paths.
    names = [line.split("==")[0] for line in requirements.read_text().splitlines() if "==" in line]
    run(
        [
            *pip,
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--find-links",
            str(wheels),
            "--target",
            str(tree / SITE),
            *target,
            "hotrestart",
            *names,
        ]
    )
    # Console scripts pip generated point at the build host's interpreter: bin/ replaces them,
    # and their lines leave the RECORD files (their hashes depend on the build host's paths).
    shutil.rmtree(tree / SITE / "bin", ignore_errors=True)
    for record in sorted((tree / SITE).glob("*.dist-info/RECORD")):
        lines = record.read_text().splitlines(keepends=True)
        record.write_text("".join(line for line in lines if not line.startswith("../../bin/")))
    versions: dict[str, str] = {}
    for info in sorted((tree / SITE).glob("*.dist-info")):
        meta = (info / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (\S+)", meta, re.M)
        ver = re.search(r"^Version: (\S+)", meta, re.M)
        if name and ver:
            versions[name.group(1)] = ver.group(1)
    return versions


def elf_files(tree: Path) -> list[Path]:
    found = []
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != "launcher":
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def verify_closure(tree: Path) -> None:
    """Every program and library resolves its libraries inside the bundle, and nowhere else."""
    loader, libdir = str(tree / LOADER), str(tree / LIBDIR)
    problems = []
    for elf in elf_files(tree):
        if elf.name.startswith("ld-linux"):
            continue
        out = subprocess.run(
            [loader, "--inhibit-cache", "--library-path", libdir, "--list", str(elf)],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in out.stdout.splitlines():
            if "not found" in line:
                problems.append(f"{elf.relative_to(tree)}: {line.strip()}")
            match = re.search(r"=> (/\S+)", line)
            if match and not match.group(1).startswith(str(tree) + "/"):
                problems.append(f"{elf.relative_to(tree)}: resolves outside the bundle: {line.strip()}")
    if problems:
        raise SystemExit("library closure incomplete:\n  " + "\n  ".join(problems))


def compile_bytecode(tree: Path) -> None:
    """Hash-based bytecode, so that nothing depends on file dates and nothing is written at run time."""
    log("compiling bytecode with the bundle's interpreter")
    python = str(tree / "bin" / "python3")
    for sub in (STDLIB, SITE):
        subprocess.run(
            [
                python,
                "-m",
                "compileall",
                "-q",
                "-j",
                "0",
                "--invalidation-mode",
                "unchecked-hash",
                "-s",
                str(tree),
                "-p",
                "/",
                "-x",
                r"/(lib2to3|test|tests|idlelib|turtledemo)/",
                str(tree / sub),
            ],
            check=False,  # a few third-party test files do not compile on purpose; the smoke check below decides
        )


def smoke(tree: Path) -> dict[str, str]:
    """Run what the bundle carries, and read the carried versions off the programs themselves."""
    bin_ = tree / "bin"
    py = run(
        [
            str(bin_ / "python3"),
            "-c",
            "import platform, grpc, zstandard, cryptography.hazmat.bindings._rust, google.protobuf, pyroute2,"
            " pynvml, opentelemetry.sdk, pycriu, hotrestart.shim_main; print(platform.python_version(),"
            " platform.libc_ver()[1])",
        ],
        capture_output=True,
    ).stdout.split()
    criu = run([str(bin_ / "criu"), "--version"], capture_output=True).stdout
    run([str(bin_ / "crit"), "--help"], capture_output=True)
    match = re.search(r"Version: (\S+)", criu)
    return {"python": py[0], "glibc": py[1], "criu": match.group(1) if match else "unknown"}


def write_info(tree: Path, info: dict[str, object]) -> None:
    dest = tree / "share" / "hotrestart"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bundle.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def normalize(info: tarfile.TarInfo, epoch: int) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = epoch
    if info.isdir():
        info.mode = 0o755
    elif info.isfile():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def write_tarball(tree: Path, out: Path, epoch: int) -> None:
    """A deterministic tar.gz of `tree` under its own name."""
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                paths = [tree, *sorted(tree.rglob("*"))]
                for path in paths:
                    arcname = str(Path(tree.name) / path.relative_to(tree)) if path != tree else tree.name
                    ti = normalize(tar.gettarinfo(str(path), arcname), epoch)
                    ti.pax_headers = {}
                    if ti.isfile():
                        with path.open("rb") as f:
                            tar.addfile(ti, io.BufferedReader(f))  # type: ignore[arg-type]
                    else:
                        tar.addfile(ti)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "dist")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bundle")
    ap.add_argument("--suite", default="sid")
    args = ap.parse_args()
    ver = version()
    name = f"hotrestart-{ver}-linux-amd64"
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    epoch = source_epoch()

    packages = download_debs(args.suite, work)
    sysroot = unpack_debs(work)
    launcher = work / "launcher"
    log("building the launcher")
    run(
        [
            os.environ.get("CC", "gcc"),
            "-static",
            "-Os",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-ffile-prefix-map={HERE}=.",
            "-o",
            str(launcher),
            str(HERE / "bundle" / "launcher.c"),
        ]
    )
    tree = work / name
    shutil.rmtree(tree, ignore_errors=True)
    assemble(sysroot, tree, launcher)
    drop_outside_links(tree)
    wheels = install_wheels(tree, work)
    log("checking the library closure")
    verify_closure(tree)
    compile_bytecode(tree)
    carried = smoke(tree)
    write_info(
        tree,
        {
            "name": "hotrestart",
            "version": ver,
            "commit": commit(),
            "platform": "linux-amd64",
            "debian_suite": args.suite,
            **carried,
            "debian_packages": packages,
            "python_packages": wheels,
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{name}.tar.gz"
    log(f"writing {out}")
    write_tarball(tree, out, epoch)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    (args.out / f"{name}.tar.gz.sha256").write_text(f"{digest}  {out.name}\n")
    size = out.stat().st_size
    print(f"{out} ({size / 2**20:.1f} MiB, sha256 {digest})")


if __name__ == "__main__":
    main()
