"""What people may write on a case: an assignee and a note.

Both are shown in the console and the API's answers, and copied into alert messages, so
what they may hold is decided here, once, for the API and the console alike. A refusal is a
:class:`~appliance.casework.cases.CaseError` with status 422 naming the field.

- An **assignee** names a person: a console username (``ana.lima``), an e-mail address
  (``ana@bank.example``) or a name (``Ana Lima``, ``José Núñez``, ``d'Arcy``). That is, 1 to
  100 characters of words made of letters, digits and ``. _ - @ '``, separated by single
  spaces. No markup (``<``, ``>``, ``&``, quotes), no control or invisible characters, no
  leading, trailing or doubled spaces. It is kept in Unicode NFC form, so the same name
  typed on two keyboards is one assignee.
- A **note** is 1 to 4000 characters of free text that is not all white space. Line breaks
  and tabs are kept; other control characters (NUL, BEL, ESC...) and the bidirectional
  embedding, override and isolate characters (which make a note read backwards on screen)
  are refused.
"""

from __future__ import annotations

import re
import unicodedata

ASSIGNEE_MAX = 100
NOTE_MAX = 4000
_ASSIGNEE = re.compile(r"[\w.@'-]+(?: [\w.@'-]+)*")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_KEPT_CONTROLS = frozenset("\t\n\r")


class TextRefused(ValueError):
    """A value a case may not hold; ``field`` names it, the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def assignee(value: str) -> str:
    """``value`` as an assignee (NFC), or :class:`TextRefused` saying what one may be."""
    name = unicodedata.normalize("NFC", value)
    if not 1 <= len(name) <= ASSIGNEE_MAX or _ASSIGNEE.fullmatch(name) is None:
        raise TextRefused("assignee", f"an assignee is 1 to {ASSIGNEE_MAX} characters: words "
                          "of letters, digits and . _ - @ ' separated by single spaces "
                          "(a username, an e-mail address or a name)")
    return name


def note(text: str) -> str:
    """``text`` as a note, or :class:`TextRefused` (blank, too long, or holding control or
    bidirectional override characters)."""
    if not text.strip():
        raise TextRefused("text", "a note needs some text, not only white space")
    if len(text) > NOTE_MAX:
        raise TextRefused("text", f"a note is at most {NOTE_MAX} characters")
    for char in text:
        if char in _BIDI_CONTROLS or (unicodedata.category(char) == "Cc"
                                      and char not in _KEPT_CONTROLS):
            raise TextRefused("text", f"a note may not hold the control character "
                              f"U+{ord(char):04X}; line breaks and tabs are fine")
    return text
