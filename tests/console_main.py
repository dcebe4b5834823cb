"""The console as NiceGUI's user simulation runs it: the same gate and pages as
``ui/mount.py``, without the mount (the simulation drives NiceGUI's own app), on the
database named by ``BRANCHGUARD_DATA_DIR``."""

from nicegui import app, ui
from nicegui.storage import Storage

from appliance.api.endpoint import Api
from appliance.settings import load
from ui.gate import Gate
from ui.pages import setup
from ui.secret import session_secret
from ui.session import Console

settings = load()
Storage.path = (settings.data_dir / "console").resolve()
console = Console(settings, Api(settings))
app.add_middleware(Gate, console=console)
app.on_shutdown(console.api.close)
setup(console)
ui.run(storage_secret=session_secret(settings), reload=False, show_welcome_message=False)
