"""This server instance's lease on its holds, and the sweep that closes expired holds of any instance.

`llmaas serve` starts one `HoldLease`: at start it closes the holds a previous run under the same
--instance-id left open, renews its lease (a row in `instances`), and sweeps; then a daemon thread
does both every `lease_s / 3` seconds (so two heartbeats can fail before the lease lapses). The sweep
closes the open holds whose deadline passed or whose owner's lease lapsed, on whichever replica gets
there first (billing/holds.py: each hold is closed once). A replica killed and restarted under another
id therefore frees its holds within about `lease_s + lease_s / 3` seconds of dying, billing each at
its last progress checkpoint. A clean exit ends the lease at once.

All of it runs in that thread, never on the event loop; a database error is logged and retried at the
next beat (a lease that lapsed meanwhile is simply renewed: the holds swept in between were billed at
their checkpoint or released, and their later settle bills them at most once).
"""

from __future__ import annotations

import logging
import threading

from llmaas.billing import Database, end_lease, renew_lease, sweep_expired_holds
from llmaas.billing.holds import lease_length

log = logging.getLogger("llmaas.server")


class HoldLease:
    def __init__(self, db: Database, instance_id: str, lease_s: float | None = None):
        self.db = db
        self.instance_id = instance_id
        self.lease_s = lease_length(lease_s).total_seconds()  # checked: 1 s to an hour
        self.interval_s = self.lease_s / 3
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Renew this instance's lease, then close expired holds (of any instance)."""
        renew_lease(self.db, self.instance_id, self.lease_s)
        swept = sweep_expired_holds(self.db)
        if swept.closed:
            log.warning(
                "closed %d expired holds: %d billed at their last checkpoint ($%.6f), %d released",
                swept.closed,
                swept.settled,
                swept.cost_micros / 1e6,
                swept.released,
            )

    def start(self) -> None:
        """The first beat now (errors raise: a server that cannot take its lease should not start),
        then one every `interval_s` in a daemon thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="llmaas-hold-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:
                log.exception("hold lease heartbeat failed; retrying in %.1f s", self.interval_s)

    def stop(self) -> None:
        """A clean exit: stop beating and end the lease (what is still open expires at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            end_lease(self.db, self.instance_id)
        except Exception:
            log.exception("ending the hold lease failed; it lapses in %.0f s", self.lease_s)
