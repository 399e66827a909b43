"""Runs under the Python that runs `emerge` (it imports Portage), never inside the node.

The binhost's Portage-side steps, each with $PKGDIR set to the binhost directory by the caller:

* `ingest` (JSON on stdin: `file`, `sign`): a binary package a job produced goes into the
  binary package tree through Portage's own code: a new build id from the tree
  (`getname_build_id(allocate_new=True)`, binpkg-multi-instance), written into the package's
  metadata (a job's fresh PKGDIR made it 1), the package signed when asked (gpkg
  `update_signature`, the code behind `gpkg-sign`, with BINPKG_GPG_SIGNING_* from the
  environment) and the signature verified, then `bintree.inject`, which moves it into place
  and rewrites `Packages` with the digests of the file as it is now.
* `list`: every instance in the index (cpv, slot, build id, build time, path).
* `remove` (JSON on stdin: `paths`): those instances leave the index and the disk through
  `bintree.remove`, which rewrites `Packages` before it deletes the file. A path that is not
  an indexed regular file inside $PKGDIR is left alone and reported.

Answers one JSON object on stdout; a failure is `{"error": "..."}` with exit status 1.
"""

import json
import os
import sys
import time


def _tree():
    import portage

    tree = portage.db[portage.root]["bintree"]
    tree.populate()
    return portage, tree


def _next_index_second(tree) -> None:
    """Wait until Portage's next index TIMESTAMP (whole seconds, from the clock) is above the
    current one: a client keeps its copy of the index unless the served TIMESTAMP is greater,
    so two writes in one second would leave it with the first for good."""
    stamp = 0
    try:
        with open(os.path.join(tree.pkgdir, "Packages"), encoding="utf-8") as index:
            for line in index:
                if not line.strip():
                    break
                if line.startswith("TIMESTAMP:"):
                    stamp = int(line.split(":", 1)[1])
    except (OSError, ValueError):
        return
    delay = stamp + 1 - time.time()
    if delay > 0:
        time.sleep(delay)


def _instances(tree) -> dict:
    """Index path -> the instance's cpv object."""
    found = {}
    for cpv in tree.dbapi.cpv_all():
        path = tree.getname(cpv)
        if path:
            found[os.path.relpath(path, tree.pkgdir)] = cpv
    return found


def _text(value) -> str:
    return (value.decode() if isinstance(value, bytes) else value).strip()


def ingest(request: dict) -> dict:
    portage, tree = _tree()
    from portage import gpkg, xpak
    from portage.versions import _pkg_str

    staged = request["file"]
    fmt = portage.binpkg.get_binpkg_format(staged)
    if fmt == "gpkg":
        package = gpkg.gpkg(tree.settings, None, staged)
        metadata = package.get_metadata()
        category, pf = _text(metadata["CATEGORY"]), _text(metadata["PF"])
    elif fmt == "xpak":
        package = xpak.tbz2(staged)
        metadata = package.get_data()
        category, pf = _text(metadata[b"CATEGORY"]), _text(metadata[b"PF"])
    else:
        raise ValueError(f"not a binary package: {os.path.basename(staged)}")
    cpv = _pkg_str(f"{category}/{pf}")
    allocated, build_id = tree.getname_build_id(cpv, allocate_new=True,
                                                remote_binpkg_format=fmt)
    try:
        if build_id is None:
            raise ValueError("binpkg-multi-instance is off: no build id to give")
        if fmt == "gpkg":
            metadata["BUILD_ID"] = str(build_id).encode()
            package.update_metadata(metadata, new_basename=f"{pf}-{build_id}")
            if request.get("sign"):
                gpkg.gpkg(tree.settings, None, staged).update_signature()
                signed = gpkg.gpkg(tree.settings, None, staged)
                signed.request_signature = True
                signed.get_metadata()  # verifies the new signature: raises if it does not
        else:
            if request.get("sign"):
                raise ValueError("only gpkg packages can be signed")
            metadata[b"BUILD_ID"] = str(build_id).encode()
            package.recompose_mem(xpak.xpak_mem(metadata))
        _next_index_second(tree)
        injected = tree.inject(cpv, current_pkg_path=staged, allocated_pkg_path=allocated)
        if injected is None:
            raise ValueError("Portage refused the package (see its message above)")
    except BaseException:
        if os.path.exists(allocated) and os.path.getsize(allocated) == 0:
            os.unlink(allocated)  # the empty placeholder the allocation made
        raise
    return {"cpv": str(injected), "build_id": injected.build_id,
            "slot": injected.slot, "path": os.path.relpath(allocated, tree.pkgdir)}


def list_instances(_request: dict) -> dict:
    _portage, tree = _tree()
    return {"instances": [{"path": path, "cpv": str(cpv), "cp": cpv.cp, "slot": cpv.slot,
                           "build_id": cpv.build_id, "build_time": cpv.build_time}
                          for path, cpv in sorted(_instances(tree).items())]}


def remove(request: dict) -> dict:
    _portage, tree = _tree()
    root = os.path.realpath(tree.pkgdir)
    index = _instances(tree)
    removed, refused = [], []
    for path in request["paths"]:
        full = os.path.join(root, path)
        inside = os.path.commonpath([root, os.path.realpath(full)]) == root
        if path not in index or not inside or os.path.islink(full) or not os.path.isfile(full):
            refused.append(path)
            continue
        _next_index_second(tree)
        tree.remove(index[path])  # rewrites Packages first; raises (and keeps it) if it cannot
        removed.append(path)
    return {"removed": removed, "refused": refused}


COMMANDS = {"ingest": ingest, "list": list_instances, "remove": remove}


def main() -> int:
    """The answer goes to the real stdout; everything Portage and gpg print goes to stderr."""
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    status = 0
    try:
        request = json.loads(sys.stdin.read() or "{}")
        answer = COMMANDS[sys.argv[1]](request)
    except Exception as exc:  # reported to the node, which logs it
        answer, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
    sys.stdout.flush()
    with os.fdopen(answer_fd, "w") as out:
        json.dump(answer, out)
    return status


if __name__ == "__main__":
    sys.exit(main())
