"""Jobs: a live table (status, progress bar, rate, ETA) with filters; the jobs on the bus
and the newest stored ones that have left it (finished jobs stay on the bus only for
daemon.finished_job_linger; the rest are read through the Manager by id)."""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select

from hypersdk.client.errors import ClientError
from hypersdk.client.names import JOB_STATUSES

from .. import format as fmt
from ..client import ClientEvent, JobState
from ..widgets import styled_status
from .base import HyperScreen

COLUMNS = ("ID", "Operation", "VM", "Status", "Progress", "Rate", "ETA", "Stage")


class JobsScreen(HyperScreen):
    heading = "Jobs"
    BINDINGS = [
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "retry_job", "Retry"),
        Binding("slash", "focus_filter", "Filter", key_display="/"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.stored: dict[str, JobState] = {}  # jobs as last seen when not on the bus

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="filters"):
            yield Select([(s, s) for s in JOB_STATUSES], prompt="All statuses",
                         id="status-filter")
            yield Input(placeholder="filter: id, VM, operation…", id="job-filter")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        table = self.query_one("#jobs", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.rebuild()
        self.load_history()
        table.focus()

    @work(group="history", exclusive=True)
    async def load_history(self) -> None:
        if not self.hyper_app.client.mirror.service_up:
            return
        try:
            self.stored = await self.hyper_app.client.recent_jobs()
        except ClientError as exc:
            self.report(exc)
            return
        self.rebuild()

    @work(group="stored")
    async def keep_stored(self, job_id: str) -> None:
        """A job that left the bus before the table saw it finished: its stored record."""
        try:
            self.stored[job_id] = await self.hyper_app.client.stored_job(job_id)
        except ClientError:
            return  # pruned (database.retention_*): gone for good
        self._update_job(job_id)

    def job(self, job_id: str) -> JobState | None:
        """The job as the bus shows it, else as it was stored."""
        return self.hyper_app.client.mirror.jobs.get(job_id) or self.stored.get(job_id)

    # -- rendering ---------------------------------------------------------------------
    def _matches(self, job: JobState) -> bool:
        status = self.query_one("#status-filter", Select).value
        if status is not Select.NULL and job.status != status:
            return False
        needle = self.query_one("#job-filter", Input).value.strip().lower()
        haystack = " ".join([job.id, job.get("VM", ""), job.get("Operation", ""),
                             job.get("Provider", "")]).lower()
        return needle in haystack

    def _cells(self, job: JobState) -> list:
        now = self.hyper_app.clock()
        return [job.id, job.get("Operation", ""), job.get("VM", ""), styled_status(job.status),
                Text(fmt.bar(job.progress, 12), style="cyan"), fmt.rate(job.get("Rate")),
                fmt.duration(job.eta_seconds(now)),
                job.get("Error", "") if job.status == "failed" else job.get("Stage", "")]

    def rebuild(self) -> None:
        table = self.query_one("#jobs", DataTable)
        table.clear()
        jobs = {**self.stored, **self.hyper_app.client.mirror.jobs}
        for job in sorted(jobs.values(), key=lambda job: job.order):
            if self._matches(job):
                table.add_row(*self._cells(job), key=job.id)

    def _update_job(self, job_id: str) -> None:
        table = self.query_one("#jobs", DataTable)
        job = self.job(job_id)
        if job is not None and job.finished:  # kept when it leaves the bus
            self.stored[job_id] = job
        present = job_id in table.rows
        if job is None or not self._matches(job):
            if present:
                table.remove_row(job_id)
            return
        if not present:
            table.add_row(*self._cells(job), key=job_id)
            return
        for column, value in zip(COLUMNS, self._cells(job)):
            table.update_cell(job_id, column, value)

    def client_event(self, event: ClientEvent) -> None:
        if event.type == "job-removed" and event.job_id not in self.stored:
            self.keep_stored(event.job_id)
        elif event.type in ("job", "job-removed"):
            self._update_job(event.job_id)
        elif event.type in ("service", "objects"):
            self.rebuild()
            self.load_history()

    @on(Select.Changed, "#status-filter")
    @on(Input.Changed, "#job-filter")
    def _filter_changed(self) -> None:
        self.rebuild()

    # -- actions -----------------------------------------------------------------------
    def selected_job(self) -> str | None:
        table = self.query_one("#jobs", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowSelected, "#jobs")
    def _open(self, event: DataTable.RowSelected) -> None:
        self.hyper_app.open_job(event.row_key.value)

    def action_focus_filter(self) -> None:
        self.set_focus(self.query_one("#job-filter", Input))

    def action_cancel_job(self) -> None:
        job_id = self.selected_job()
        if job_id:
            self.hyper_app.cancel_job(job_id)

    def action_retry_job(self) -> None:
        job_id = self.selected_job()
        if job_id:
            self.hyper_app.retry_job(job_id)
