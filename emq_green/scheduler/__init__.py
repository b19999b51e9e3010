"""emq-green's scheduler: periodic and delayed jobs for an eMQP/1.0 router.

:class:`Scheduler` (``service.py``: the link to the router, firing),
:class:`ScheduleTable` (``table.py``: when each schedule fires),
:class:`ScheduleStore` (``store.py``: the SQLite file).
"""

from .service import Scheduler, SchedulerState
from .store import ScheduleStore
from .table import Entry, ScheduleTable

__all__ = ["Entry", "ScheduleStore", "ScheduleTable", "Scheduler", "SchedulerState"]
