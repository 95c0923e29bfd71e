"""A listener's revocation list file, reloaded when it changes, before handshakes check it.

The file is read in a worker thread (a list may hold 100,000 entries); handshakes that
arrive meanwhile wait for it, so none is checked against a list the file has replaced.
"""

from __future__ import annotations

import anyio
import anyio.to_thread

from stalk import _logs
from stalk.certificates import RevocationFile, utc_text
from stalk.errors import IdentityFileError, RevocationListError

__all__ = ["RevocationReloader"]

logger = _logs.LISTENER


class RevocationReloader:
    """Puts a revocation file's new version in force, one reload at a time."""

    __slots__ = ("_reloading",)

    def __init__(self) -> None:
        self._reloading = anyio.Lock()

    async def up_to_date(self, revocations: RevocationFile) -> None:
        """Return once the newest readable version of ``revocations`` is in force.

        Called before each handshake. A version that cannot be read, is not signed by one
        of the file's authorities, or is not newer than the list in force is logged and
        changes nothing.
        """
        # A reload under way counts as a change: the file's version is marked read before
        # its list is in force, and this handshake must wait for that list.
        if revocations.changed() or self._reloading.locked():
            await self._reload(revocations)

    async def _reload(self, revocations: RevocationFile) -> None:
        async with self._reloading:
            if not revocations.changed():
                return  # another handshake reloaded it while we waited
            try:
                loaded = await anyio.to_thread.run_sync(revocations.read)
                applied = revocations.apply(loaded)
            except (IdentityFileError, RevocationListError) as exc:
                logger.warning(
                    "revocation list %s not reloaded, the one in force stays: %s",
                    revocations.path,
                    exc,
                )
                return
            if not applied:
                logger.warning(
                    "revocation list %s not reloaded: issued %s, not after the one in force",
                    revocations.path,
                    utc_text(loaded.issued_at),
                )
                return
            logger.info(
                "revocation list %s reloaded: %d serials and %d keys revoked (issued %s)",
                revocations.path,
                len(loaded.serials),
                len(loaded.subjects),
                utc_text(loaded.issued_at),
            )
