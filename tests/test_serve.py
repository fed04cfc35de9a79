"""``vla-ft serve``: a policy over HTTP gives the actions of the local policy, to our client and to
a client written from the protocol alone; refused inputs come back as the policy's own message."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_recipe

from robot_data import SyntheticReader
from vla_ft import ChunkRunner, VLAPolicy
from vla_ft.policy import resolve_directory
from vla_ft.serve import PolicyClient, PolicyServer, decode
from vla_ft.train import main as train

TASKS = ["pick up the red block", "pick up the green block"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    torch.set_num_threads(1)
    train(tiny_recipe(tmp, "data.history=2", "train.steps=2", "checkpoint.every=2", "train.val_every=0"))
    return tmp / "run"


@pytest.fixture(scope="module")
def served(run_dir):
    """(the local policy, the URL of a server of the same policy in this process)."""
    policy = VLAPolicy.from_pretrained(run_dir)
    server = PolicyServer(policy, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield policy, f"http://127.0.0.1:{server.server_port}"
    server.stop()
    thread.join(timeout=30)


def _inputs(batch: int | None):
    rng = np.random.default_rng(0)
    shape = (batch,) if batch else ()
    frames = rng.integers(0, 256, (*shape, 48, 80, 3), dtype=np.uint8)  # any size: resized as in training
    state = rng.normal(size=(*shape, 2, 3)).astype(np.float32)  # two state frames (data.history=2)
    return frames, state


def test_the_client_gets_the_local_policys_actions(served):
    policy, url = served
    client = PolicyClient(url)
    assert (client.cameras, client.chunk, client.action_dim) == (policy.cameras, policy.chunk, policy.action_dim)
    for batch, task in ((None, TASKS[0]), (2, TASKS)):
        frames, state = _inputs(batch)
        want = policy.predict_action(frames, task, state)
        got = client.predict_action({policy.cameras[0]: frames}, task, state)
        np.testing.assert_array_equal(got, want)  # same model, same inputs: bit for bit
    client.close()


def test_the_protocol_by_hand(served):
    """What a robot written in another language would do: GET /info as JSON, POST an npz."""
    policy, url = served
    with urllib.request.urlopen(f"{url}/info") as response:
        info = json.loads(response.read())
    assert info["cameras"] == policy.cameras and info["history"] == 2 and info["gripper"]["dims"] == [2]
    frames, state = _inputs(None)
    body = io.BytesIO()
    np.savez(body, **{f"images/{info['cameras'][0]}": frames}, state=state, instruction=np.array(TASKS[1]))
    request = urllib.request.Request(f"{url}/predict", body.getvalue(), method="POST")
    with urllib.request.urlopen(request) as response:
        actions = np.load(io.BytesIO(response.read()))["actions"]
    np.testing.assert_array_equal(actions, policy.predict_action(frames, TASKS[1], state))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{url}/predict", b"not an npz", method="POST"))
    assert err.value.code == 400


def test_a_refused_input_raises_the_policys_message_and_the_server_goes_on(served):
    policy, url = served
    client = PolicyClient(url)
    frames, state = _inputs(None)
    with pytest.raises(ValueError, match=r"images: this policy needs 1 camera"):
        client.predict_action([frames, frames], TASKS[0], state)  # caught before sending
    with pytest.raises(ValueError, match=r"policy server .*: state: expected shape \(2, 3\)"):
        client.predict_action(frames, TASKS[0], state[0])  # one state frame where the policy reads two
    np.testing.assert_array_equal(
        client.predict_action(frames, TASKS[0], state), policy.predict_action(frames, TASKS[0], state)
    )


def _post(url: str, body, headers: dict[str, str], **kw) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/predict", body, headers, **kw)
    response = conn.getresponse()
    status, text = response.status, response.read().decode(errors="replace")
    conn.close()
    return status, text


def test_malformed_requests_are_told_what_is_wrong(served):
    """Bodies a hand-written client gets wrong come back as 4xx naming the fault, never as a 500,
    a dropped connection or actions for a garbled prompt; the server goes on serving."""
    policy, url = served
    frames, state = _inputs(None)
    arrays = {f"images/{policy.cameras[0]}": frames, "state": state, "instruction": np.array(TASKS[0])}
    npy = io.BytesIO()
    np.save(npy, frames)
    kind = {"Content-Type": "application/octet-stream"}
    cases = [
        (b"", kind, {}, 400, "body: not an .npz"),
        (npy.getvalue(), kind, {}, 400, "body: one .npy array"),
        (_npz({**arrays, "instruction": np.array([TASKS])}), kind, {}, 400, "instruction: a str or a 1-D str array"),
        (iter([_npz(arrays)]), kind, {"encode_chunked": True}, 411, "Content-Length: expected the body's size"),
        (_npz(arrays), {**kind, "Content-Length": "ten"}, {}, 411, "got ten"),
        # a TiB announced: refused unread (read() allocated it up front, and the thread died of MemoryError)
        (b"0123456789", {**kind, "Content-Length": str(2**40)}, {}, 413, "more than this server reads"),
    ]
    for body, headers, kw, status, message in cases:
        got = _post(url, body, headers, **kw)
        assert got[0] == status and message in got[1], (message, got)
    assert _post(url, _npz(arrays), kind)[0] == 200


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    body = io.BytesIO()
    np.savez(body, **arrays)
    return body.getvalue()


class _SlowOnce:
    """A stand-in policy whose first prediction takes 2 s; the actions echo the state."""

    meta = {"state_dim": 1, "history": 1, "image_size": 8, "gripper": {"closed_is_high": True}}
    cameras, chunk, action_dim, fps, source, directory = ["cam"], 2, 1, None, None, "stub"
    calls = 0

    def gripper_range(self):
        return [], np.zeros(0), np.zeros(0)

    def predict_action(self, images, instruction, state):
        self.calls += 1
        if self.calls == 1:
            time.sleep(2)
        return np.full((2, 1), float(state[0]), np.float32)


def test_a_client_whose_request_timed_out_goes_on_working():
    """A timeout leaves http.client's connection half-used: the client must start a fresh one, or
    every later call fails although the server is answering again."""
    server = PolicyServer(_SlowOnce(), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    client = PolicyClient(f"http://127.0.0.1:{server.server_port}", timeout=0.5)
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TimeoutError, match=r"policy server .*: no answer within 0.5 s"):
        client.predict_action(frame, "x", np.array([1.0]))
    time.sleep(2)  # the server finishes the slow prediction
    assert client.predict_action(frame, "x", np.array([2.0])).ravel().tolist() == [2.0, 2.0]
    client.close()
    server.stop()
    thread.join(timeout=30)


def test_a_chunk_runner_drives_the_served_policy_as_the_local_one(served):
    policy, url = served
    frames, state = _inputs(None)
    sent = []
    for source in (policy, PolicyClient(url)):
        runner = ChunkRunner(source, ensemble=0.5)  # gripper snapping reads gripper_range()
        sent.append([runner.act(frames, TASKS[0], state) for _ in range(5)])
    np.testing.assert_array_equal(np.stack(sent[1]), np.stack(sent[0]))


def _served_fps(policy) -> tuple[float | None, float | None]:
    """(fps in ``GET /info`` read as plain JSON, fps of a PolicyClient) of ``policy`` served."""
    server = PolicyServer(policy, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{url}/info") as response:
            info = json.loads(response.read())
        client = PolicyClient(url)
        client.close()
        return info["fps"], client.fps
    finally:
        server.stop()
        thread.join(timeout=30)


def test_the_policy_the_server_and_the_client_give_the_checkpoints_control_rate(served):
    """A robot-side loop runs a chunk at the rate the policy trained at: the local policy, /info and
    the client all give model_meta.json's fps (the synthetic task's rate, which it trained on)."""
    policy, url = served
    recorded = json.loads((policy.directory / "model_meta.json").read_text())["fps"]
    assert recorded == SyntheticReader(episodes=1).fps  # the rate of the data trained on
    with urllib.request.urlopen(f"{url}/info") as response:
        assert json.loads(response.read())["fps"] == recorded
    assert policy.fps == recorded and PolicyClient(url).fps == recorded


def test_a_checkpoint_that_records_no_control_rate_gives_none_everywhere(run_dir, tmp_path):
    """A checkpoint written before fps was recorded: None locally, null in /info, None in the client."""
    old = tmp_path / "old"
    shutil.copytree(resolve_directory(run_dir), old)
    meta = json.loads((old / "model_meta.json").read_text())
    del meta["fps"]
    (old / "model_meta.json").write_text(json.dumps(meta))
    policy = VLAPolicy.from_pretrained(old)
    assert policy.fps is None and _served_fps(policy) == (None, None)


def test_vla_ft_serve_on_the_command_line(run_dir):
    command = [sys.executable, "-m", "vla_ft", "serve", str(run_dir), "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, line or proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        frames, state = _inputs(None)
        want = VLAPolicy.from_pretrained(run_dir).predict_action(frames, TASKS[0], state)
        np.testing.assert_allclose(PolicyClient(url).predict_action(frames, TASKS[0], state), want, atol=1e-6)
        port = url.rsplit(":", 1)[1]  # taken by the server above: a second one says so in one line
        taken = subprocess.run([*command[:-1], port], capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and f"--port: cannot listen on 127.0.0.1:{port}" in taken.stderr, taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with pytest.raises(ConnectionRefusedError, match="no policy server at"):
        PolicyClient(url)


def test_serve_options_are_checked_naming_the_flag(run_dir, capsys):
    """--port 99999 was an OverflowError traceback, --device cpuu torch's RuntimeError, --device meta
    accepted, and a host that does not resolve was blamed on --port."""
    from vla_ft.cli import main as cli

    for value in ("99999", "-1"):
        with pytest.raises(SystemExit) as info:
            cli(["serve", str(run_dir), "--port", value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"argument --port: must be an integer in 0..65535, got '{value}'" in err
    for args, message in (
        (["--device", "cpuu"], "--device: 'cpuu' is not a torch device"),
        (["--device", "meta"], "--device: meta holds no values"),
        (["--host", "no-such-host.invalid"], "--host: cannot listen on no-such-host.invalid:0"),
        # --dtype float16 is accepted (the host fails first: serve binds before it loads the model)
        (["--dtype", "float16", "--host", "192.0.2.1"], "--host: cannot listen on 192.0.2.1:0"),
    ):
        assert cli(["serve", str(run_dir), "--port", "0", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


class _OtherServer(BaseHTTPRequestHandler):
    """A web server that is not vla-ft's: an HTML page with the server's ``status`` for every GET."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        page = b"<html><body>hello</body></html>"
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format, *args) -> None:
        """Quiet."""


@pytest.mark.parametrize("status", [200, 404])
def test_a_client_of_another_server_says_it_is_not_a_policy_server(status):
    """Pointed at another server, the client raised JSONDecodeError; now an error naming the URL."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), _OtherServer)
    other.status = status
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{other.server_port}"
    try:
        with pytest.raises(RuntimeError, match=f"{url} answered GET /info with .*not a vla-ft policy server"):
            PolicyClient(url)
    finally:
        other.shutdown()
        other.server_close()


def test_a_prediction_that_is_no_npz_of_actions_says_the_server_is_not_ours(served):
    """A 200 answer to POST /predict that is not vla-ft's (another server behind the same URL) was a
    ValueError about the request body, as if the robot's input were at fault."""
    policy, url = served
    client = PolicyClient(url)
    frames, state = _inputs(None)
    client._request = lambda method, path, body=None: b"<html>hello</html>"
    with pytest.raises(RuntimeError, match=f"{url} answered POST /predict with no .npz of actions"):
        client.predict_action(frames, TASKS[0], state)


def test_the_latency_benchmark_runs(run_dir):
    script = Path(__file__).parents[1] / "benchmarks" / "serve_latency.py"
    command = [sys.executable, str(script), str(run_dir), "--size", "32", "--requests", "2"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| PolicyClient -> vla-ft serve |" in out.stdout and "| added by serving |" in out.stdout


def test_a_request_that_arrives_while_stopping_is_answered(run_dir):
    """A request queued behind the stop is refused with an error instead of waiting forever."""
    server = PolicyServer(VLAPolicy.from_pretrained(run_dir), "127.0.0.1", 0)
    server.stop()
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_raised(server.predict, {})))
    thread.start()
    while server.jobs.qsize() < 2:  # the stop, then the request
        threading.Event().wait(0.01)
    server.serve()  # ends at the stop and answers the request behind it
    thread.join(timeout=30)
    assert [type(e).__name__ for e in errors] == ["RuntimeError"] and "stopping" in str(errors[0])


def _raised(call, *args):
    try:
        call(*args)
    except Exception as err:
        return err
    return None


@pytest.mark.parametrize("bad", ["host", "port"])
def test_a_bad_host_or_port_is_refused_before_the_checkpoint_is_loaded(tmp_path, capsys, monkeypatch, bad):
    """--host was checked only when the server bound, after the model had loaded (minutes for a
    large one): the error must come first, without reading the checkpoint at all."""
    from vla_ft.cli import main as cli
    from vla_ft.policy import VLAPolicy as Policy

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --host/--port were checked")

    monkeypatch.setattr(Policy, "from_pretrained", no_load)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    args = {"host": ["--host", "no-such-host.invalid", "--port", "0"], "port": ["--port", str(port)]}[bad]
    try:
        assert cli(["serve", str(tmp_path / "no-checkpoint"), *args]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"--{bad}: cannot listen on" in err and "Traceback" not in err, err


def test_a_server_without_its_policy_yet_refuses_connections():
    """Bound but still loading: a robot that connects is refused (as before the model loaded in
    front of the bind), instead of hanging in the listen backlog until its timeout."""
    server = PolicyServer(None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}"
    with pytest.raises(ConnectionRefusedError, match="no policy server at"):
        PolicyClient(url, timeout=5)
    server.attach(_Echo())
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    client = PolicyClient(url, timeout=5)
    assert client.predict_action(np.zeros((8, 8, 3), np.uint8), "x", np.array([4.0])).ravel().tolist() == [4.0, 4.0]
    client.close()
    server.stop()
    thread.join(timeout=30)


class _Echo(_SlowOnce):
    """A stand-in policy that answers at once: the actions echo the state."""

    def predict_action(self, images, instruction, state):
        return np.full((2, 1), float(np.asarray(state).ravel()[0]), np.float32)


@pytest.fixture
def echo_server():
    server = PolicyServer(_Echo(), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_port}"
    server.stop()
    thread.join(timeout=30)


def test_a_compressed_body_is_held_to_the_size_limit_once_unpacked(echo_server):
    """MAX_BODY bounds what a request makes the server allocate, but a deflated npz of zeros
    (savez_compressed: 16 MiB of frames in ~16 KiB) passed the Content-Length check and was
    unpacked whole: a 64 MiB body could unpack to tens of GiB and take the GPU machine down.
    The unpacked size the zip declares is checked before anything is unpacked."""
    server, url = echo_server
    server.max_body = 2**20  # 1 MiB: the limit a small machine would set
    frames = np.zeros((16, 1024, 1024), np.uint8)  # 16 MiB unpacked
    body = io.BytesIO()
    np.savez_compressed(body, **{"images/cam": frames}, state=np.array([1.0]), instruction=np.array("x"))
    assert len(body.getvalue()) < server.max_body  # passes the Content-Length check
    status, text = _post(url, body.getvalue(), {"Content-Type": "application/octet-stream"})
    assert status == 413 and "unpacks to" in text and str(server.max_body) in text, (status, text)
    client = PolicyClient(url)  # a compressed body within the limit is served
    small = io.BytesIO()
    np.savez_compressed(small, **{"images/cam": np.zeros((8, 8, 3), np.uint8)}, state=[3.0], instruction="x")
    assert decode(client._request("POST", "/predict", small.getvalue()))["actions"].ravel().tolist() == [3.0, 3.0]


def test_a_body_damaged_inside_an_array_is_a_400(echo_server):
    """The zip directory parses, the array's bytes fail their CRC: zipfile's BadZipFile was
    answered 500 ("a failure of the policy itself") with a traceback, for the client's bad bytes."""
    _, url = echo_server
    arrays = {"images/cam": np.full((8, 8, 3), 7, np.uint8), "state": np.array([1.0]), "instruction": np.array("x")}
    body = bytearray(_npz(arrays))
    at = body.index(bytes([7] * 64))  # inside the frame's data
    body[at] = 8
    status, text = _post(url, bytes(body), {"Content-Type": "application/octet-stream"})
    assert status == 400 and "body: a damaged .npz" in text and "CRC" in text, (status, text)


def test_concurrent_clients_each_get_the_actions_of_their_own_inputs(served):
    """Eight robots at once, each with its own connection and inputs: predictions run one at a
    time in the serving thread, and every answer is the local policy's for that client's inputs."""
    from concurrent.futures import ThreadPoolExecutor

    policy, url = served
    rng = np.random.default_rng(1)
    inputs = [(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.normal(size=(2, 3))) for _ in range(8)]
    want = [policy.predict_action(frames, TASKS[i % 2], state) for i, (frames, state) in enumerate(inputs)]

    def robot(i: int) -> list[np.ndarray]:
        client = PolicyClient(url)
        try:
            return [client.predict_action(inputs[i][0], TASKS[i % 2], inputs[i][1]) for _ in range(3)]
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(robot, range(8)))
    for i, answers in enumerate(got):
        for answer in answers:
            np.testing.assert_array_equal(answer, want[i])


def test_a_state_of_strings_or_complex_numbers_and_an_empty_batch_are_told_by_name(served):
    """A state sent as text was refused with numpy's "could not convert string to float", naming
    no input; a complex state lost its imaginary part and was served; a batch of 0 frames was
    "need at least one array to stack". Each is a 400 naming the input, and the server goes on."""
    policy, url = served
    frames, state = _inputs(None)
    camera = f"images/{policy.cameras[0]}"
    good = {camera: frames, "state": state, "instruction": np.array(TASKS[0])}
    kind = {"Content-Type": "application/octet-stream"}
    empty = {camera: np.zeros((0, 48, 80, 3), np.uint8), "state": np.zeros((0, 2, 3)), "instruction": np.array([], str)}
    cases = [
        ({**good, "state": state.astype(str)}, "state: expected real numbers, got <U"),
        ({**good, "state": state.astype(complex)}, "state: expected real numbers, got complex128 (2, 3)"),
        (empty, "images: a batch of 0 frames"),
    ]
    for arrays, message in cases:
        status, text = _post(url, _npz(arrays), kind)
        assert status == 400 and message in text, (message, status, text)
    assert _post(url, _npz(good), kind)[0] == 200


def _crafted_npz(members: dict[str, tuple[tuple[int, ...], str, bytes]]) -> bytes:
    """An npz whose ``.npy`` headers declare ``(shape, dtype)`` over the given data bytes, whatever
    their length: what a hostile client can send (numpy.savez always writes matching ones)."""
    from numpy.lib import format as npy

    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        for name, (shape, dtype, data) in members.items():
            header = io.BytesIO()
            descr = npy.dtype_to_descr(np.dtype(dtype))
            npy.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue() + data)
    return body.getvalue()


def test_an_array_declaring_more_than_the_body_holds_is_refused_before_numpy_allocates_it(echo_server):
    """A 300-byte npz whose frame's header declares 8192x8192 bytes: the zip's sizes pass the limit,
    and numpy reserved the declared 64 MiB before finding the data missing (a 400 naming no array);
    a header of a zero-width dtype declared millions of elements at 0 bytes and was served. Each is
    answered from the header alone, naming the array: 413 past the limit, 400 past what it holds."""
    import tracemalloc

    server, url = echo_server
    server.max_body = 2**20
    ok = {"images/cam": ((8, 8, 3), "u1", bytes(192)), "state": ((1,), "<f8", np.float64(1).tobytes())}
    ok["instruction"] = ((), "<U1", np.array("x").tobytes())
    kind = {"Content-Type": "application/octet-stream"}
    assert _post(url, _crafted_npz(ok), kind)[0] == 200  # honest headers are served
    huge, holds_less = (8192, 8192), (1000,)
    cases = [
        ({**ok, "images/cam": (huge, "u1", bytes(16))}, 413, ["'images/cam'", str(huge), str(server.max_body)]),
        ({**ok, "instruction": ((2**21,), "<U0", b"")}, 413, ["'instruction'", f"{2**21} elements"]),
        ({**ok, "state": (holds_less, "<f8", bytes(16))}, 400, ["'state'", str(holds_less), "holds 16"]),
    ]
    for arrays, status, words in cases:
        got = _post(url, _crafted_npz(arrays), kind)
        assert got[0] == status and all(w in got[1] for w in words), (words, got)
    # what decoding allocates, measured by tracemalloc (numpy reports its buffers to it)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="'images/cam'"):
            decode(_crafted_npz({"images/cam": (huge, "u1", bytes(16))}), server.max_body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < server.max_body, peak
    assert _post(url, _crafted_npz(ok), kind)[0] == 200  # and the server goes on
