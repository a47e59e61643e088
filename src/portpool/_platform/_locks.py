"""The kernel's table of file locks, keyed by device and inode."""

from __future__ import annotations

from collections.abc import Iterable


class LockTable(dict[tuple[int, int], int]):
    """``(device, inode) -> pid`` of every file lock held right now.

    The device is the one the kernel lists (``/proc/locks`` prints it as hex
    ``major:minor``), encoded like ``st_dev``. Matching by inode alone let any lock on
    another filesystem whose file shares a small inode number make a dead holder look
    alive (tmpfs inode numbers are small and reused).
    """

    def __init__(
        self, entries: Iterable[tuple[tuple[int, int], int]] = (), *, complete: bool = True
    ) -> None:
        super().__init__(entries)
        self.inodes = {ino for _, ino in self}
        # False: locks kept changing while the kernel's table was read, and one held
        # throughout may be missing (every lock listed was held).
        self.complete = complete

    def holds(self, device: int, inode: int) -> bool | None:
        """True if a lock is listed on (``device``, ``inode``); False if none is listed on
        that inode anywhere in a complete table; None otherwise.

        None is "cannot tell from the table": btrfs subvolumes and overlay mounts list a
        lock under the filesystem's device while ``stat`` gives another one, another
        user's file may share the inode number, and an incomplete table may have missed
        the lock. The caller then asks the file itself.
        """
        if (device, inode) in self:
            return True
        return None if inode in self.inodes or not self.complete else False
