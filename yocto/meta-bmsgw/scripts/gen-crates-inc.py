#!/usr/bin/env python3
"""Write recipes-connectivity/bmsgw/bmsgw-crates.inc from the repository's Cargo.lock.

The output has the layout of oe-core's cargo-update-recipe-crates class
(`bitbake -c update_crates bmsgw`): one `crate://crates.io/<name>/<version>`
SRC_URI entry per crates.io package, in Cargo.lock order, then one
`SRC_URI[<name>-<version>.sha256sum]` line each. This script exists because
that task needs a configured bitbake build directory, and because the task
also walks fuzz/Cargo.lock, which the ECU build does not use.

Usage (Python 3.11 or newer, standard library only):
    yocto/meta-bmsgw/scripts/gen-crates-inc.py           # rewrite the file
    yocto/meta-bmsgw/scripts/gen-crates-inc.py --check   # exit 1 if stale
"""

import argparse
import sys
import tomllib
from pathlib import Path

LAYER = Path(__file__).resolve().parent.parent
REPO = LAYER.parent.parent
DEFAULT_LOCK = REPO / "Cargo.lock"
DEFAULT_OUT = LAYER / "recipes-connectivity" / "bmsgw" / "bmsgw-crates.inc"


def registry_packages(lock_path):
    """(name, version, checksum) of every crates.io package, in file order.

    Path and git packages (the root crate among them) have no crates.io
    source and are skipped, as the oe-core class skips them.
    """
    with open(lock_path, "rb") as f:
        lock = tomllib.load(f)
    out = []
    for package in lock.get("package", []):
        if "crates.io" not in package.get("source", ""):
            continue
        checksum = package.get("checksum")
        if not checksum:
            # The fetcher needs a checksum for every crate; a lock file
            # without one was not written by a current cargo.
            sys.exit(
                f"{lock_path}: package {package['name']} {package['version']} "
                "has no checksum; regenerate the lock file with `cargo generate-lockfile`"
            )
        out.append((package["name"], package["version"], checksum))
    if not out:
        sys.exit(f"{lock_path}: no crates.io packages found")
    return out


def render(packages, lock_name):
    # An explicit `name=` gives each version its own checksum key; bitbake
    # fetchers that default the name to the crate name alone would
    # otherwise give two versions of one crate the same key.
    lines = [
        "# Generated from Cargo.lock by yocto/meta-bmsgw/scripts/gen-crates-inc.py;",
        "# the format of oe-core's 'bitbake -c update_crates bmsgw'. Do not edit.",
        "",
        f"# from {lock_name}",
        'SRC_URI += " \\',
    ]
    for name, version, _ in packages:
        lines.append(f"    crate://crates.io/{name}/{version};name={name}-{version} \\")
    lines.append('"')
    lines.append("")
    for name, version, checksum in packages:
        lines.append(f'SRC_URI[{name}-{version}.sha256sum] = "{checksum}"')
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="Cargo.lock to read")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="include file to write")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the include file differs from what would be written",
    )
    args = parser.parse_args()

    text = render(registry_packages(args.lock), "Cargo.lock")
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run {Path(__file__).relative_to(REPO)}", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count('.sha256sum]')} crates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
