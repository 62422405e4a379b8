"""One job: its properties, a progress bar and its log following live."""
from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Log, ProgressBar, Static

from hypersdk.client.errors import ClientError

from .. import format as fmt
from ..client import ClientEvent, JobState
from ..widgets import styled_status
from .base import HyperScreen


class JobScreen(HyperScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("r", "retry_job", "Retry"),
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.stored: JobState | None = None  # its record, once it has left the bus

    def compose_body(self) -> ComposeResult:
        yield Static(id="job-summary")
        yield ProgressBar(total=100, show_eta=False, id="job-progress")
        yield Log(id="job-log", highlight=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.refresh_summary()
        self.follow()

    @property
    def job(self) -> JobState | None:
        return self.hyper_app.client.mirror.jobs.get(self.job_id) or self.stored

    def refresh_summary(self) -> None:
        job = self.job
        summary = self.query_one("#job-summary", Static)
        if job is None:
            summary.update(Text(f"{self.job_id}: not known to the service", style="red"))
            return
        now = self.hyper_app.clock()
        text = Text.assemble((f"{job.id}", "bold"), f"  {job.get('Operation', '')}  ",
                             styled_status(job.status))
        rows = [("VM", job.get("VM", "") or "—"), ("Provider", job.get("Provider", "") or "—"),
                ("Stage", job.get("Stage", "") or "—"),
                ("Bytes", f"{fmt.size(job.get('BytesDone', 0))} of "
                          f"{fmt.size(job.get('BytesTotal', 0))}"),
                ("Rate", fmt.rate(job.get("Rate"))),
                ("ETA", fmt.duration(job.eta_seconds(now))),
                ("Attempts", str(job.get("Attempts", 0)))]
        if job.get("Error"):
            rows.append(("Error", job.get("Error")))
        verified = fmt.boot_verification(job.to_dict()["result"])
        if verified:
            rows.append(("Booted", verified))
        for label, value in rows:
            text.append(f"\n{label:>9}: ", style="dim")
            text.append(str(value), style="bold red" if label == "Error" else "")
        summary.update(text)
        bar = self.query_one("#job-progress", ProgressBar)
        progress = job.progress
        bar.update(total=100 if progress is not None else None,
                   progress=(progress or 0) * 100)

    @work(group="log", exclusive=True)
    async def follow(self) -> None:
        """The log so far, then new lines as the service signals them; for a job that
        has left the bus, its record and log from the store."""
        log = self.query_one("#job-log", Log)
        client = self.hyper_app.client
        try:
            if self.job_id in client.mirror.jobs:
                async for line in client.follow_log(self.job_id):
                    log.write_line(line.format())
                return
            self.stored = await client.stored_job(self.job_id)
            self.refresh_summary()
            for line in await client.get_log(self.job_id):
                log.write_line(line.format())
        except ClientError as exc:
            log.write_line(f"[log unavailable: {exc}]")

    def client_event(self, event: ClientEvent) -> None:
        if event.job_id == self.job_id and event.type in ("job", "completed"):
            self.refresh_summary()
        elif event.type == "service":
            self.refresh_summary()
            if self.hyper_app.client.mirror.service_up:
                self.query_one("#job-log", Log).clear()
                self.follow()

    def action_cancel_job(self) -> None:
        self.hyper_app.cancel_job(self.job_id)

    def action_retry_job(self) -> None:
        self.hyper_app.retry_job(self.job_id)
