"""Before any work of a several-process job: do all its processes see the same `out`?

The ranks of a job share their state through one folder: the main process reads the other ranks'
RNG files in a checkpoint, every rank reads the token and feature caches the main process wrote,
and every rank reads the job record to decide whether there is work at all. On storage that is
not shared (a node-local disk, a relative path in each node's own working folder, memory://,
which is private to each process) such a job fails late, at its first checkpoint, or its ranks
decide differently and wait for each other. So every rank writes a marker under the folder and
the main process checks that it sees them all; otherwise every rank stops with the same line.

No rank is left waiting: each one takes part in every collective whatever happened to it (a
failed write is reported to the main process, not raised), and the main process broadcasts the
verdict. The markers are named by a token the main process draws for this attempt, so markers
left by an earlier, killed attempt cannot pass for this one's; each rank removes its own. One
process has nothing to share and skips all of it.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any, Callable, Optional

from accelerate.utils import broadcast_object_list, gather_object

from medclf import storage
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

MARKER = ".medclf-preflight"
HINT = (
    "several processes need a folder they all see: a shared filesystem mounted at the same path on every "
    "node, or s3:// (not a node-local disk, a relative path in per-node working folders, or memory://)"
)

# Folders found shared in this process group: `medclf run`'s stages share one and check it once.
_checked: set[str] = set()


def check_shared(accelerator: Any, url: str, what: str = "out") -> None:
    """Refuse, on every rank with the same MedclfError, a folder `url` (`what` names it: its spec
    key) that not every process of the job sees; returns at once in a single process."""
    if accelerator.num_processes == 1 or url in _checked:
        return
    main, rank = accelerator.is_main_process, accelerator.process_index
    token = _from_main([uuid.uuid4().hex if main else None])
    marker = storage.join(url, marker_name(token, rank))
    problem = _attempt(marker, lambda: storage.write_json(marker, {"rank": rank, "host": socket.gethostname()}))
    ranks = gather_object([(rank, socket.gethostname(), problem)])
    verdict = _from_main([verdict_of(url, what, token, ranks) if main else None])
    cleanup = _attempt(marker, lambda: storage.remove(marker))
    if cleanup:
        log.warning("preflight: could not remove %s", cleanup)
    if verdict:
        raise MedclfError(verdict)
    _checked.add(url)
    log.info("preflight: %s (%s) is seen by all %d processes", what, url, len(ranks))


def marker_name(token: str, rank: int) -> str:
    return f"{MARKER}-{token}-rank{rank:05d}"


def verdict_of(url: str, what: str, token: str, ranks: list[tuple[int, str, Optional[str]]]) -> Optional[str]:
    """The main process's verdict on (rank, host, write problem) of every rank: None when it sees
    every rank's marker of this attempt (`token`), else the one line every rank raises."""
    failed = [(rank, host, problem) for rank, host, problem in ranks if problem]
    if failed:
        rank, host, problem = failed[0]
        return f"{what} ({url}): rank {rank} on {host} cannot write its preflight marker ({problem}); {HINT}"
    # Each marker by its name, not by a listing: an NFS client may answer a listing from its cache
    # for up to a minute, but asks the server for a name it has never looked up (the token is new).
    seen: list[bool] = []
    markers = [storage.join(url, marker_name(token, rank)) for rank, _, _ in ranks]
    unread = _attempt(url, lambda: seen.extend(storage.exists(marker) for marker in markers))
    if unread:
        return f"{what} ({url}): the main process cannot read the preflight markers ({unread})"
    missing = [(rank, host) for (rank, host, _), there in zip(ranks, seen, strict=True) if not there]
    if not missing:
        return None
    shown = ", ".join(f"rank {rank} on {host}" for rank, host in missing[:4])
    shown += f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return (
        f"{what} ({url}) is not one folder shared by all {len(ranks)} processes: the main process "
        f"({ranks[0][1]}) does not see the markers of {shown}; {HINT}"
    )


def _from_main(value: list) -> Any:
    """The main process's value, on every rank."""
    return broadcast_object_list(value)[0]


def _attempt(url: str, action: Callable[[], Any]) -> Optional[str]:
    """None when `action` succeeds, else what went wrong, in words: a rank that failed must still
    reach the next collective, or the others would wait for it."""
    try:
        action()
    except MedclfError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - every backend raises its own kinds
        return f"{url}: {storage.describe_error(e)}"
    return None
