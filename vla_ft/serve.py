"""A trained policy served over HTTP, for a robot whose computer is not the GPU machine (openpi's
policy server, LeRobot's asynchronous inference).

::

    vla-ft serve runs/aloha --device cuda --dtype bfloat16 --host 0.0.0.0 --port 8000   # the GPU machine

    from vla_ft import ChunkRunner                                                     # the robot
    from vla_ft.serve import PolicyClient

    runner = ChunkRunner(PolicyClient("http://gpu-box:8000"), ensemble=0.01)
    robot.send(runner.act(camera.read(), "insert the peg", robot.state()))

:class:`PolicyClient` has :class:`~vla_ft.policy.VLAPolicy`'s interface (``predict_action``,
``cameras``, ``chunk``, ``action_dim``, ``fps``, ``meta``, ``gripper_range``), so a control loop
written for a local policy runs unchanged (at ``fps``, the rate the policy trained at). The protocol
is plain HTTP with numpy's ``.npz`` as the body (frames are large; JSON would be slow), so any
language with an npz reader can be a client:

=====================  =======================================================================
``GET /info``          JSON: ``cameras``, ``chunk``, ``action_dim``, ``state_dim``, ``history``,
                       ``image_size``, ``fps`` (the control rate trained at, Hz; null where the
                       checkpoint records none), ``gripper`` (``dims``, ``closed_is_high``,
                       ``low``, ``high``: the open/closed values), ``source``, ``directory``
``POST /predict``      npz in: ``images/<camera>`` uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` for
                       each camera, ``state`` float (as ``predict_action`` takes it),
                       ``instruction`` a str array, ``()`` or ``(B,)``;
                       npz out: ``actions`` float32 ``(chunk, A)`` or ``(B, chunk, A)``
=====================  =======================================================================

A request body needs a ``Content-Length`` (a chunked one is answered 411) of at most
:data:`MAX_BODY` bytes (64 MiB: a batch of 64 uncompressed 480x640 frames; a larger one is answered
413 before it is read, so a client's header cannot make the server allocate gigabytes), and its
arrays may unpack to no more (a compressed npz, ``numpy.savez_compressed``, is read; one that
unpacks to more is answered 413 before it is unpacked), nor may any array's ``.npy`` header
declare more (413; an array declaring more bytes than it holds is 400; both before numpy allocates
it). An input the policy refuses is answered 400 with JSON ``{"error": message}`` (the client
raises ValueError with the policy's message); a failure of the policy itself is 500
(RuntimeError). Connections stay open between requests (a server closes one idle for a minute;
the client reconnects); predictions run one at a time (one model), in the thread that serves
(:meth:`PolicyServer.serve`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import io
import json
import math
import queue
import socket
import sys
import threading
import traceback
import urllib.parse
import zipfile
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from numpy.lib import format as npy

from vla_ft.execution import PolicyShape

IMAGE_PREFIX = "images/"
# The largest request body read, in bytes: 64 uncompressed 480x640 RGB frames (59 MiB) and their state.
MAX_BODY = 64 * 2**20


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays -> the bytes of an uncompressed ``.npz`` (``np.load`` reads them)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class BodyTooLarge(ValueError):
    """A request body that unpacks to more than the server reads (answered 413)."""


def decode(body: bytes, limit: int | None = None) -> dict[str, np.ndarray]:
    """The bytes of an ``.npz`` -> named arrays; no pickled objects are accepted. Anything else
    (empty, an ``.npy``, a damaged file) is a ValueError. ``limit``: the most bytes the arrays
    may unpack to (a compressed npz of zeros unpacks a thousandfold), else :class:`BodyTooLarge`,
    checked on the sizes the zip declares (zipfile never unpacks a member past its declared size)
    and on the shape each array's ``.npy`` header declares (:func:`check_declared_size`)."""
    try:
        loaded = np.load(io.BytesIO(body), allow_pickle=False)
    except (EOFError, OSError, ValueError) as err:
        raise ValueError(f"body: not an .npz of named arrays ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("body: one .npy array; expected an .npz of named arrays (numpy.savez)")
    with loaded as npz:
        unpacked = sum(info.file_size for info in npz.zip.infolist())
        if limit is not None and unpacked > limit:
            raise BodyTooLarge(f"body: unpacks to {unpacked} bytes, more than this server reads ({limit})")
        for info in npz.zip.infolist():
            check_declared_size(npz.zip, info, limit)
        try:
            return {name: npz[name] for name in npz.files}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, MemoryError) as err:  # bad CRC, cut short
            raise ValueError(f"body: a damaged .npz ({type(err).__name__}: {err})") from None


def check_declared_size(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int | None) -> None:
    """An ``.npy`` member's header against what may be read, before numpy reads it: numpy allocates
    the whole array its header declares before reading the data, so a few bytes declaring a shape
    of gigabytes made the server reserve them (or a zero-width dtype billions of elements to loop
    over). The declared size must fit ``limit`` (else :class:`BodyTooLarge`) and the bytes the
    member holds (else ValueError); both name the array. Members that are not ``.npy`` (numpy
    reads them as bytes of their declared size) pass."""
    name = info.filename.removesuffix(".npy")
    try:
        with archive.open(info) as fp:
            if fp.read(len(npy.MAGIC_PREFIX)) != npy.MAGIC_PREFIX:
                return
            fp.seek(0)
            version = npy.read_magic(fp)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            # 3.0 differs from 2.0 only in the header's text encoding (utf8: structured dtypes'
            # field names), which changes neither the shape nor the item size
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(fp)
            holds = info.file_size - fp.tell()
    except (zipfile.BadZipFile, EOFError, OSError) as err:  # a small member is read whole: its CRC fails here
        raise ValueError(f"body: a damaged .npz ({type(err).__name__}: {err})") from None
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"body: array '{name}' has a damaged .npy header ({type(err).__name__}: {err})") from None
    count = math.prod(shape)
    declared = count * dtype.itemsize
    what = f"array '{name}' declares shape {tuple(shape)} {dtype}"
    # a zero-width dtype (<U0) holds no bytes: its elements count, one byte each, as loops run over them
    if limit is not None and max(declared, count) > limit:
        size = f"{declared} bytes" if declared >= count else f"{count} elements"
        raise BodyTooLarge(f"body: {what}, {size}, more than this server reads ({limit})")
    if declared > holds:
        raise ValueError(f"body: {what}, {declared} bytes, but holds {holds}: a damaged .npz")


def policy_info(policy: Any) -> dict[str, Any]:
    """What a client needs to know about ``policy`` (a :class:`~vla_ft.policy.VLAPolicy`), JSON-safe."""
    meta = policy.meta
    dims, low, high = policy.gripper_range()
    return {
        "cameras": policy.cameras,
        "chunk": policy.chunk,
        "action_dim": policy.action_dim,
        "state_dim": int(meta["state_dim"]),
        "history": int(meta["history"]),
        "image_size": int(meta["image_size"]),
        "fps": policy.fps,  # the control rate trained at; null where the checkpoint records none
        "gripper": {
            "dims": dims,
            "closed_is_high": bool(meta["gripper"]["closed_is_high"]),
            "low": [float(v) for v in low],
            "high": [float(v) for v in high],
        },
        "source": policy.source,
        "directory": str(policy.directory) if policy.directory is not None else None,
    }


class PolicyServer(ThreadingHTTPServer):
    """Serves ``policy`` on ``(host, port)`` (port 0: a free one, then :attr:`server_port`).

    :meth:`serve` answers HTTP in a background thread (a thread per connection) and runs every
    prediction, one at a time, in the thread that called it: on a CPU, torch's thread pool is warm
    in the thread that keeps using it, and a matmul ran at half the speed when each connection's
    thread ran its own (``benchmarks/RESULTS.md``, policy server)."""

    daemon_threads = True  # a client that keeps its connection open must not keep the server alive
    max_body = MAX_BODY  # bytes; a larger request is answered 413 unread

    def __init__(self, policy: Any | None, host: str = "127.0.0.1", port: int = 8000):
        """Binds at once (a bad ``host`` or a taken ``port`` is an OSError here) and listens once
        it has a policy; ``policy`` None: :meth:`attach` one before :meth:`serve`. ``vla-ft serve``
        binds before it loads the model, so a bad ``--host`` or ``--port`` fails in a second, and a
        robot that connects while the model loads is refused as if no server were there."""
        super().__init__((host, port), _Handler, bind_and_activate=False)
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise
        self.policy: Any = None
        self.info: dict[str, Any] = {}
        self.jobs: queue.Queue[tuple[dict[str, np.ndarray], Future] | None] = queue.Queue()
        if policy is not None:
            self.attach(policy)

    def attach(self, policy: Any) -> None:
        """The policy to serve; the server listens from now on."""
        self.policy, self.info = policy, policy_info(policy)
        self.server_activate()

    def serve(self) -> None:
        """Serve until :meth:`stop` (or Ctrl-C), predicting in the calling thread."""
        if self.policy is None:
            raise RuntimeError("PolicyServer.serve: no policy; attach() one first")
        http = threading.Thread(target=self.serve_forever, daemon=True)
        http.start()
        try:
            while (job := self.jobs.get()) is not None:
                arrays, future = job
                try:
                    future.set_result(self._predict(arrays))
                except Exception as err:  # the connection's thread raises it
                    future.set_exception(err)
        finally:
            self.shutdown()
            http.join()
            self.server_close()
            while not self.jobs.empty():  # requests that arrived while stopping: answered, not left waiting
                if (job := self.jobs.get()) is not None:
                    job[1].set_exception(RuntimeError("the policy server is stopping"))

    def stop(self) -> None:
        self.jobs.put(None)

    def predict(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Called by a connection's thread: the prediction, computed by the :meth:`serve` thread."""
        future: Future = Future()
        self.jobs.put((arrays, future))
        return future.result()

    def _predict(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """A decoded request -> actions; a malformed request is a ValueError naming what is wrong."""
        images = {k[len(IMAGE_PREFIX) :]: v for k, v in arrays.items() if k.startswith(IMAGE_PREFIX)}
        missing = [k for k in ("state", "instruction") if k not in arrays]
        if missing or not images:
            lacks = ", ".join(missing or [f"{IMAGE_PREFIX}<camera>"])
            raise ValueError(f"request: needs {IMAGE_PREFIX}<camera>, state and instruction; lacks {lacks}")
        instruction = arrays["instruction"]
        if instruction.dtype.kind != "U" or instruction.ndim > 1:
            raise ValueError(f"instruction: a str or a 1-D str array, got {instruction.dtype} {instruction.shape}")
        text = str(instruction) if instruction.ndim == 0 else [str(t) for t in instruction]
        return self.policy.predict_action(images, text, arrays["state"])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a control loop sends one request per chunk
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle would hold the body ~40 ms
    timeout = 60.0  # seconds a connection may stall mid-request (or idle) before its thread lets go
    server: PolicyServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/info":
            return self._reply(404, _json({"error": f"no {self.path}; GET /info, POST /predict"}), "application/json")
        self._reply(200, _json(self.server.info), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():  # chunked or unknown: what follows cannot be read as one body
            self.close_connection = True
            error = f"Content-Length: expected the body's size in bytes, got {length or 'none'}"
            self._reply(411, _json({"error": error}), "application/json")
            return self._drain()
        if int(length) > self.server.max_body:  # refused before reading: read() allocates the whole length
            self.close_connection = True
            error = f"Content-Length: {length} bytes, more than this server reads ({self.server.max_body})"
            self._reply(413, _json({"error": error}), "application/json")
            return self._drain()
        body = self.rfile.read(int(length))
        if self.path.rstrip("/") != "/predict":
            return self._reply(404, _json({"error": f"no {self.path}; POST /predict"}), "application/json")
        try:
            actions = self.server.predict(decode(body, self.server.max_body))
        except BodyTooLarge as err:
            return self._reply(413, _json({"error": str(err)}), "application/json")
        except (ValueError, OSError) as err:  # the caller's input (a bad npz is an OSError or ValueError)
            return self._reply(400, _json({"error": str(err)}), "application/json")
        except Exception as err:  # the policy failed (e.g. non-finite outputs): say so, keep serving
            traceback.print_exc()
            return self._reply(500, _json({"error": f"{type(err).__name__}: {err}"}), "application/json")
        self._reply(200, encode({"actions": np.asarray(actions, np.float32)}), "application/octet-stream")

    def _drain(self, idle: float = 0.5) -> None:
        """Read what the client still sends before closing (a lingering close): closing on unread
        bytes resets the connection, and the client gets a broken pipe instead of the answer."""
        self.connection.settimeout(idle)
        try:
            while self.connection.recv(65536):
                pass
        except OSError:  # idle for ``idle`` s (a timeout is an OSError) or reset
            pass

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request per control step would flood the terminal."""


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _parsed_json(data: bytes) -> Any:
    """``data`` as JSON; None where it is none (another server's HTML, bytes that are not text)."""
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


class _Connection(http.client.HTTPConnection):
    """http.client sends a request's headers and body in two writes; without TCP_NODELAY the body
    waits for the server's delayed ACK (~40 ms a request on Linux)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PolicyClient(PolicyShape):
    """A served policy with :class:`~vla_ft.policy.VLAPolicy`'s interface; see the module docstring."""

    def __init__(self, url: str, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url: expected http://HOST:PORT, got {url!r}")
        self.url = f"http://{parts.hostname}:{parts.port or 80}"
        self._conn = _Connection(parts.hostname, parts.port or 80, timeout=timeout)
        self.info = self._info()
        self.meta = self.info  # cameras, chunk, action_dim, fps, history, gripper: what control loops read
        self.directory = self.info["directory"]

    def _info(self) -> dict[str, Any]:
        """GET /info, checked to be a vla-ft server's: another server on that port (a web page, another
        API) is said to be one, instead of failing on its reply's JSON or keys."""
        info = _parsed_json(self._request("GET", "/info"))
        needed = ("cameras", "chunk", "action_dim", "history", "gripper", "directory")
        if not isinstance(info, dict) or any(key not in info for key in needed):
            raise self._not_ours("GET /info", "a reply without the policy's description")
        return info

    def _not_ours(self, request: str, what: str) -> RuntimeError:
        return RuntimeError(f"{self.url} answered {request} with {what}: not a vla-ft policy server (`vla-ft serve`)")

    def gripper_range(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        g = self.info["gripper"]
        return list(g["dims"]), np.asarray(g["low"], np.float32), np.asarray(g["high"], np.float32)

    def predict_action(self, images: Any, instruction: str | list[str], state: Any) -> np.ndarray:
        """As :meth:`VLAPolicy.predict_action`, computed by the server."""
        from vla_ft.policy import _as_array, camera_frames

        frames = camera_frames(self.cameras, images)
        arrays = {f"{IMAGE_PREFIX}{c}": f for c, f in zip(self.cameras, frames, strict=True)}
        arrays["state"] = _as_array(state)
        arrays["instruction"] = np.asarray(instruction if isinstance(instruction, str) else list(instruction), str)
        answer = self._request("POST", "/predict", encode(arrays))  # a refused input raises the server's ValueError
        try:
            return decode(answer)["actions"]
        except (ValueError, KeyError):  # a vla-ft server answers 200 with an npz of actions
            raise self._not_ours("POST /predict", "no .npz of actions") from None

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        for attempt in (0, 1):  # the server may have closed an idle connection: reconnect once
            try:
                self._conn.request(method, path, body, headers)
                response = self._conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._conn.close()
                if attempt:
                    raise
            except ConnectionRefusedError:
                raise ConnectionRefusedError(f"no policy server at {self.url} (is `vla-ft serve` running?)") from None
            except TimeoutError:
                self._conn.close()  # half a request/response: the next call starts a fresh connection
                raise TimeoutError(f"policy server {self.url}: no answer within {self._conn.timeout} s") from None
            except BaseException:
                self._conn.close()
                raise
        if response.status == 200:
            return data
        error = _parsed_json(data)
        if not isinstance(error, dict) or not isinstance(error.get("error"), str):  # vla-ft's errors: {"error": str}
            raise self._not_ours(f"{method} {path}", f"HTTP {response.status} {data[:80]!r}")
        raise (ValueError if response.status == 400 else RuntimeError)(f"policy server {self.url}: {error['error']}")

    def close(self) -> None:
        self._conn.close()


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from vla_ft.config import RecipeError
    from vla_ft.policy import VLAPolicy

    dtype = getattr(torch, args.dtype)
    try:  # listen first: a bad --host or a taken --port is told before a model loads for minutes
        server = PolicyServer(None, args.host, args.port)
    except OSError as err:  # the port is taken, or the address is not this machine's
        where, why = f"{args.host}:{args.port}", err.strerror or err
        raise RecipeError(f"{listen_flag(err)}: cannot listen on {where} ({why})", "command line") from None
    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint, args.device, dtype, ema=args.ema, source=args.source)
    except BaseException as err:  # the bound port is given back whatever ends the load
        server.server_close()
        if isinstance(err, ValueError):  # a device or dtype it cannot run on; per-source statistics and --source
            raise RecipeError(f"--{err}", "command line") from None
        raise
    server.attach(policy)
    print(f"serving {policy.directory} at http://{args.host}:{server.server_port} (GET /info, POST /predict)")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve()
    return 0


def listen_flag(err: OSError) -> str:
    """The flag to blame for a failure to listen: ``--host`` for a name that does not resolve or an
    address that is not this machine's, ``--port`` for one taken or reserved."""
    host_errors = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
    return "--host" if isinstance(err, socket.gaierror) or err.errno in host_errors else "--port"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vla_ft.data_cli import at_least
    from vla_ft.evaluate import CHECKPOINT_HELP

    text = "serve a policy over HTTP for a robot on another computer (see vla_ft.serve)"
    p = sub.add_parser("serve", help=text, description=text)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=at_least(0, 65535), default=8000, help="port (0: any free one, printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="of the weights")
    p.add_argument("--source", default=None, help="per-source statistics: the robot's source")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="act with the weight average")
    p.set_defaults(func=cmd_serve)
