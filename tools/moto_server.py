"""Start moto's server with Flotilla's extension loaded (see flotilla_moto.py).

Usage: python tools/moto_server.py -H 127.0.0.1 -p 5000
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flotilla_moto  # noqa: E402  (patches moto before the server imports it)
from moto.server import main  # noqa: E402

if __name__ == "__main__":
    # Emulated instances reach this server with their "instance profile"
    # credentials, as a real instance reaches AWS (see flotilla_moto gap 15).
    if "-p" in sys.argv:
        port = sys.argv[sys.argv.index("-p") + 1]
        os.environ.setdefault("FLOTILLA_EMU_ENDPOINT", f"http://127.0.0.1:{port}")
    flotilla_moto.reset_scratch()
    main(sys.argv[1:])
