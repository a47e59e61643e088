"""State-dir JSON files (``portpool._jsonfile``): what reading them may import, and when.

Decoding a record must never be the first use of a module: the first decode of a fresh
state dir happened inside ``Instance.release()``, and orjson segfaults when a signal
handler raises during its import (a second Ctrl-C while a program stopped).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.helpers import run_python, write_layout

# Starts an instance of the layout argv[1] and releases it with SIGINT raised (default
# handler: KeyboardInterrupt) the moment a compiled module's init imports another module
# (an import called by importlib itself, no Python code between), as orjson's init
# does: where orjson crashed, hit every time, where a real Ctrl-C lands only by chance.
# Prints, as JSON, the modules release() imported.
RELEASE_UNDER_SIGNALS = """
import json, signal, sys
from portpool.instance import start_instance
from portpool.layout import load_layout

def in_compiled_init():
    frame = sys._getframe()
    while frame.f_code.co_name != "_find_and_load":
        frame = frame.f_back
    return frame.f_back.f_code.co_name == "_call_with_frames_removed"

class SignalInCompiledInit:
    def find_spec(self, name, path=None, target=None):
        if in_compiled_init():
            signal.raise_signal(signal.SIGINT)
        return None

instance = start_instance(load_layout(sys.argv[1]), heartbeat=False)
signal.signal(signal.SIGINT, signal.default_int_handler)
before = set(sys.modules)
sys.meta_path.insert(0, SignalInCompiledInit())
instance.release()
del sys.meta_path[0]
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_release_imports_nothing_so_a_signal_cannot_crash_it(
    tmp_path: Path, home: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "portpool.toml", port_base)
    done = run_python(RELEASE_UNDER_SIGNALS, str(config))
    # A segfault (-SIGSEGV) was orjson's import interrupted; KeyboardInterrupt (-SIGINT)
    # any other import that release() was first to make.
    assert done.returncode == 0, (
        f"release() died: {signal.Signals(-done.returncode).name if done.returncode < 0 else ''}"
        f" status {done.returncode}\n{done.stderr[-2000:]}"
    )
    assert json.loads(done.stdout) == []
    assert not list(home.glob("apps/*/instances/*.json"))  # ... and it did release
