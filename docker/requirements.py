"""Print pip requirements taken from pyproject.toml, one per line.

The image builds install dependencies in layers of their own, before the sources arrive, so
a code change does not re-install torch. The pins stay in pyproject.toml, the one place
they are declared:

    python3 docker/requirements.py pyproject.toml --only torch torchvision   # torch layer
    python3 docker/requirements.py pyproject.toml --extra flower             # the rest
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    match = _NAME.match(req)
    if not match:
        raise ValueError(f"cannot read a project name from requirement {req!r}")
    return canonical(match.group(1))


def requirements(project: dict, extras: list[str], only: list[str] | None) -> list[str]:
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"unknown extra(s) {unknown}; pyproject.toml declares {sorted(optional)}")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += optional[extra]
    own = canonical(project["name"])
    reqs = [r for r in reqs if requirement_name(r) != own]  # e.g. "fedssl[flower]" inside an extra
    if only is not None:
        wanted = {canonical(n) for n in only}
        reqs = [r for r in reqs if requirement_name(r) in wanted]
        missing = wanted - {requirement_name(r) for r in reqs}
        if missing:
            raise ValueError(f"pyproject.toml does not require {sorted(missing)}")
    return reqs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pyproject")
    p.add_argument("--extra", action="append", default=[], help="include this optional-dependencies group (repeatable)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="keep only these projects")
    args = p.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    try:
        reqs = requirements(project, args.extra, args.only)
    except ValueError as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
