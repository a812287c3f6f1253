"""Start moto's server with Flotilla's extension loaded (see flotilla_moto.py).

Usage: python tools/moto_server.py -H 127.0.0.1 -p 5000

With real block devices (flotilla_devices.py), the server runs in a mount
namespace of its own, so its EBS store and every emulated instance's mounts
are never seen on the host and go when the server goes. Where they cannot
be had it says why in one line and skips block-device scripts; with CI=true
it refuses to start instead, so CI always runs the real path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flotilla_devices  # noqa: E402

if __name__ == "__main__":
    why = flotilla_devices.reason()
    if why is None and os.environ.get("FLOTILLA_EMU_MOUNT_NS") != str(os.getpid()):
        # Same pid after exec: unshare without --fork execs in place.
        os.environ["FLOTILLA_EMU_MOUNT_NS"] = str(os.getpid())
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable, *sys.argv])
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            print(f"flotilla_moto: no real block devices: {why}; CI=true needs them", file=sys.stderr)
            sys.exit(2)
        print(f"flotilla_moto: no real block devices ({why}); mount and unmount scripts are skipped", file=sys.stderr)

import flotilla_moto  # noqa: E402  (patches moto before the server imports it)
from moto.server import main  # noqa: E402

SLOW_SECONDS = 0.5


def _log_slow_requests():
    """Log every request that takes SLOW_SECONDS or more, with its action:
    where the local stack's time goes when a figure of the smoke run is
    late (tools/fast_path.py)."""
    import io
    import time
    import urllib.parse

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    served = DomainDispatcherApplication.__call__

    def timed(self, environ, start_response):
        action = environ.get("HTTP_X_AMZ_TARGET", "")
        if not action and environ.get("REQUEST_METHOD") == "POST":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
        action = action or f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO', '')[:60]}"
        started = time.monotonic()
        try:
            return served(self, environ, start_response)
        finally:
            took = time.monotonic() - started
            if took >= SLOW_SECONDS:
                print(f"flotilla_moto: {time.strftime('%H:%M:%S')} slow request: {action} took {took:.2f} s",
                      file=sys.stderr, flush=True)

    DomainDispatcherApplication.__call__ = timed

if __name__ == "__main__":
    # Emulated instances reach this server with their "instance profile"
    # credentials, as a real instance reaches AWS (see flotilla_moto gap 15).
    if "-p" in sys.argv:
        port = sys.argv[sys.argv.index("-p") + 1]
        os.environ.setdefault("FLOTILLA_EMU_ENDPOINT", f"http://127.0.0.1:{port}")
    _log_slow_requests()
    flotilla_moto.reset_scratch()
    flotilla_moto.start_devices()
    main(sys.argv[1:])
