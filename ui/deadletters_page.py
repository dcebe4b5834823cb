"""Dead letters: what the scorer refused, newest first, filtered by reason; a click shows one
with its whole body (control and bidi characters written out, never acted on) and its
re-submissions. Analysts and above, as in the API; re-submitting is the command line's
(``branchguard deadletters resubmit``), which publishes to NATS."""

from __future__ import annotations

from typing import Any

from nicegui import ui

from appliance.casework.deadletters import DeadLetter, DeadLetterError, listing, printable, show
from appliance.casework.keys import role_at_least
from appliance.casework.numbers import number_text

from .layout import signed_in, when
from .session import Console

ROLE = "analyst"
PAGE_SIZE = 50
COLUMNS = [
    {"name": "stream_seq", "label": "stream seq", "field": "stream_seq", "align": "left"},
    {"name": "received", "label": "received (UTC)", "field": "received", "align": "left"},
    {"name": "subject", "label": "subject", "field": "subject", "align": "left"},
    {"name": "reason", "label": "reason", "field": "reason", "align": "left"},
    {"name": "size", "label": "bytes", "field": "size", "align": "right"},
    {"name": "resubmitted", "label": "re-submitted", "field": "resubmitted_text",
     "align": "left"},
]


def table_row(letter: DeadLetter) -> dict[str, Any]:
    return {"stream_seq": letter.stream_seq, "received": when(letter.received_at),
            "subject": printable(letter.subject), "reason": printable(letter.reason),
            "size": number_text(letter.size),
            "resubmitted_text": "yes" if letter.resubmitted else ""}


def body_text(letter: DeadLetter) -> str:
    """The body as a person should read it (see ``printable``), or why it cannot be."""
    if letter.body is None:
        return "(not recorded: dead-lettered before bodies were kept; TX_DLQ has it 30 days)"
    text = letter.body_text()
    if text is None:
        return f"(not UTF-8; {number_text(len(letter.body))} bytes, shown as escapes)\n" + \
            printable(letter.body.decode("utf-8", "backslashreplace"))
    note = (f"\n(the first {number_text(len(letter.body))} of "
            f"{number_text(letter.size)} bytes)"
            if letter.truncated else "")
    return printable(text) + note


class DeadLettersView:
    """One tab's dead-letter list: the reason filter, the pages seen, the one shown."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.reason: str | None = None
        self.pages: list[int | None] = [None]
        """The ``before_seq`` of each page so far (None: the newest)."""
        self.rows: list[DeadLetter] = []

    def build(self) -> None:
        with ui.row().classes("w-full items-end gap-2"):
            ui.input("reason contains", on_change=lambda e: self.filter(e.value)
                     ).classes("w-72").props("clearable data-testid=deadletters-reason")
            ui.button("Refresh", on_click=self.refresh).props("flat")
        self.table = ui.table(columns=COLUMNS, rows=[], row_key="stream_seq").classes("w-full")
        self.table.props("dense flat data-testid=deadletters")
        self.table.add_slot("body", r"""
            <q-tr :props="props" @click="$parent.$emit('open', props.row)"
                  class="cursor-pointer" :data-stream-seq="props.row.stream_seq">
              <q-td v-for="col in props.cols" :key="col.name" :props="props">
                {{ col.value }}
              </q-td>
            </q-tr>""")
        self.table.on("open", lambda e: self.open(int(e.args["stream_seq"])))
        with ui.row().classes("items-center gap-2"):
            ui.button("newest", on_click=self.first).props("flat data-testid=deadletters-newest")
            self.pager = ui.label().props("data-testid=deadletters-pager")
            ui.button("older", on_click=self.older).props("flat data-testid=deadletters-older")
        self.detail = ui.column().classes("w-full").props("data-testid=deadletter")
        self.refresh()

    def filter(self, value: str | None) -> None:
        self.reason = (value or "").strip() or None
        self.first()

    def first(self) -> None:
        self.pages = [None]
        self.refresh()

    def older(self) -> None:
        if self.rows and len(self.rows) == PAGE_SIZE:
            self.pages.append(self.rows[-1].stream_seq)
            self.refresh()

    def refresh(self) -> None:
        self.rows = listing(self.console.reader(), before_seq=self.pages[-1],
                            reason=self.reason, limit=PAGE_SIZE)
        self.table.rows = [table_row(r) for r in self.rows]
        self.table.update()
        shown = f"{len(self.rows)} dead letter(s)" if self.rows else "no dead letters"
        self.pager.set_text(f"page {len(self.pages)} · {shown}"
                            + (f" whose reason contains “{self.reason}”" if self.reason else ""))

    def open(self, stream_seq: int) -> None:
        self.detail.clear()
        try:
            letter = show(self.console.reader(), stream_seq)
        except DeadLetterError as exc:
            ui.notify(exc.message, type="warning")
            return
        with self.detail:
            ui.label(f"Dead letter {letter.stream_seq}").classes("text-lg font-bold")
            ui.label(f"subject: {printable(letter.subject)}").props(
                "data-testid=deadletter-subject")
            ui.label(f"reason: {printable(letter.reason)}").props(
                "data-testid=deadletter-reason")
            ui.label(f"received {when(letter.received_at)} UTC · "
                     f"{number_text(letter.size)} bytes")
            ui.label(body_text(letter)).classes(
                "whitespace-pre-wrap font-mono bg-gray-100 p-2 w-full break-all").props(
                "data-testid=deadletter-body")
            for r in letter.resubmissions:
                ui.label(f"re-submitted by {r.actor} at {when(r.at)} UTC (attempt "
                         f"{r.attempt}{', corrected body' if r.edited else ''}): {r.outcome}")
            if not letter.resubmissions:
                ui.label("not re-submitted; after a fix: branchguard deadletters resubmit "
                         f"{letter.stream_seq} [--body FILE]").classes("text-gray-500")


def deadletters_page(console: Console) -> None:
    user = signed_in(console, "Dead letters")
    if user is None:
        return
    if not role_at_least(user.role, ROLE):
        ui.label(f"The dead-letter page needs the {ROLE} role or above; you are {user.role}."
                 ).props("data-testid=deadletters-refused")
        return
    DeadLettersView(console).build()
