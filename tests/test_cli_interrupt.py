"""Ctrl-C during ``idcraft generate`` (a real process on a terminal, the offline world's models): the
generation stops at its next step, one line says so, no traceback, no output file, exit status 130."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "src" / "idcraft" / "world" / "bundle"


def read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """Bytes from the terminal until ``marker`` shows (or the process closes it, or the time is up)."""
    out, end = b"", time.monotonic() + timeout
    while marker not in out and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the process ended and closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def test_ctrl_c_stops_generate_cleanly(tmp_path):
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    reference = tmp_path / "ref.png"
    reference_image(held_out_ids()[0]).save(reference)
    output = tmp_path / "out.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    main, terminal = pty.openpty()  # stderr on a terminal: the progress bar says when steps run
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # else tqdm draws 0 columns
    process = subprocess.Popen(
        [
            sys.executable, "-m", "idcraft", "generate",
            "--base", str(BUNDLE / "sd"),
            "--adapter", str(BUNDLE / "adapters" / "ip-adapter_world.safetensors"),
            "--image-encoder", str(BUNDLE / "image_encoder"),
            "--reference", str(reference), "--prompt", "a portrait", "--steps", "500",
            "--device", "cpu", "--output", str(output),
        ],
        stdout=terminal, stderr=terminal, env=env,
    )  # fmt: skip
    os.close(terminal)
    try:
        seen = read_until(main, b"/500", timeout=180)
        assert b"/500" in seen, seen.decode(errors="replace")
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
        seen += read_until(main, b"\0", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main)
    text = seen.decode(errors="replace")
    assert code == 130, text
    assert "Traceback" not in text and text.count("interrupted") == 1, text
    last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.strip() == "interrupted", text
    assert not output.exists() and list(tmp_path.iterdir()) == [reference]  # no partial file either
